"""Channels that carry the recommended service config.

The config (``service_config.json`` in this package) retries UNAVAILABLE with
exponential backoff and bounds every unary call with a timeout:

- Transitions (HoldSlot, ConfirmAppointment, ...) are retried too. That is safe
  only because a repeated ``request_id`` replays the first outcome instead of
  acting twice: always set ``request_id`` on transitions (``new_request_id()``).
- Creates without a ``request_id`` (CreateUser, CreateSpecialist, CreateSlot,
  BatchCreateSlots) and DeleteSlot are not retried: a retry after a lost reply
  could act twice.
- WatchAppointmentEvents has neither timeout nor retry: the stream is long-lived,
  and resuming it needs the last cursor (see ``booking_client.events``).

No client keepalive is configured: a server refuses pings more frequent than
it allows (by default every 5 minutes) with GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any

import grpc

Metadata = Sequence[tuple[str, str]]


def service_config() -> dict[str, Any]:
    """The recommended service config, as a dict you may adjust."""
    text = resources.files(__package__).joinpath("service_config.json").read_text()
    config: dict[str, Any] = json.loads(text)
    return config


def channel_options(config: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", json.dumps(service_config() if config is None else config)),
        ("grpc.enable_retries", 1),
    ]


def insecure_channel(
    target: str,
    *,
    config: dict[str, Any] | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A plaintext channel with the recommended service config (for local use)."""
    return grpc.aio.insecure_channel(target, options=[*channel_options(config), *options])


def secure_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    *,
    config: dict[str, Any] | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A TLS channel (system roots unless `credentials` says otherwise)."""
    return grpc.aio.secure_channel(
        target,
        credentials or grpc.ssl_channel_credentials(),
        options=[*channel_options(config), *options],
    )


def bearer(token: str) -> list[tuple[str, str]]:
    """Call metadata that authenticates with an access token from Login."""
    return [("authorization", f"Bearer {token}")]


def new_request_id() -> str:
    """A fresh idempotency key: reuse it for every retry of the same transition."""
    return str(uuid.uuid4())
