"""The server's keepalive policy and connection age, as grpc channel args.

A client may ping as often as keepalive_min_ping_seconds, also between
calls; a faster one is tolerated MAX_PING_STRIKES times, then told GOAWAY
too_many_pings. Connections are closed after max_connection_age_seconds
(jittered by grpc), so long-lived clients spread over new servers; calls in
flight get the age grace to finish, and clients reconnect transparently.
"""

from __future__ import annotations

from service.config import Config

# grpc's default: pings that come too fast are forgiven twice.
MAX_PING_STRIKES = 2
# grpc's value for "never" (INT_MAX milliseconds).
NEVER_MS = 2**31 - 1


def _ms(seconds: float) -> int:
    return min(NEVER_MS, max(1, round(seconds * 1000)))


def server_options(config: Config) -> list[tuple[str, int]]:
    grace = config.max_connection_age_grace_seconds
    if grace is None:
        grace = config.grace_seconds
    age = config.max_connection_age_seconds
    return [
        # Despite the name, grpc-core applies it to every ping received
        # (with or without calls in flight) once pings without calls are permitted.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.keepalive_min_ping_seconds)),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.max_connection_age_ms", _ms(age) if age > 0 else NEVER_MS),
        ("grpc.max_connection_age_grace_ms", _ms(grace) if grace > 0 else 0),
    ]
