"""Benchmark harness for booking-service: ``booking-service bench``.

See docs/performance.md for what it measures and how to read the figures.
"""
