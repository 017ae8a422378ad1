"""Fault-injection suite for booking-service: ``booking-service chaos``.

See docs/chaos.md for what it does to the service and what it checks.
"""
