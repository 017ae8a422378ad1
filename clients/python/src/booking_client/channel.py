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

The timeouts are applied by a client interceptor, not by gRPC's service-config
``timeout``: in grpcio (seen with 1.85) a service-config timeout fires one to two
seconds early (a 1 s timeout fails at once, without sending the call), while a
per-call timeout is exact. The JSON still lists them, for clients in other
languages; ``channel_options`` hands gRPC the config without them.

No client keepalive is configured: a server refuses pings more frequent than
it allows (by default every 5 minutes) with GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, cast

import grpc

Metadata = Sequence[tuple[str, str]]


def service_config() -> dict[str, Any]:
    """The recommended service config, as a dict you may adjust."""
    text = resources.files(__package__).joinpath("service_config.json").read_text()
    config: dict[str, Any] = json.loads(text)
    return config


def _seconds(duration: str) -> float:
    if not duration.endswith("s"):
        raise ValueError(f"not a service-config duration: {duration!r}")
    return float(duration[:-1])


def method_timeouts(config: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Timeouts by (service, method); method "" for a whole service."""
    timeouts = {}
    for entry in config.get("methodConfig", ()):
        if "timeout" in entry:
            for name in entry["name"]:
                timeouts[name.get("service", ""), name.get("method", "")] = _seconds(
                    entry["timeout"]
                )
    return timeouts


def channel_options(config: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """gRPC channel options: the service config without its timeouts, retries on."""
    config = service_config() if config is None else config
    without_timeouts = {
        **config,
        "methodConfig": [
            {key: value for key, value in entry.items() if key != "timeout"}
            for entry in config.get("methodConfig", ())
        ],
    }
    return [
        ("grpc.service_config", json.dumps(without_timeouts)),
        ("grpc.enable_retries", 1),
    ]


class DefaultTimeouts(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Gives a unary call without a timeout of its own the config's timeout for it.

    A shorter timeout passed to the call still wins; the retries of the service
    config happen within it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._timeouts = method_timeouts(config)

    def timeout_for(self, method: str) -> float | None:
        service, _, name = method.lstrip("/").partition("/")
        for key in ((service, name), (service, ""), ("", "")):
            if key in self._timeouts:
                return self._timeouts[key]
        return None

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        if client_call_details.timeout is None:
            # bytes at run time, whatever the type stubs say.
            method: str | bytes = cast(Any, client_call_details.method)
            if isinstance(method, bytes):
                method = method.decode()
            timeout = self.timeout_for(method)
            if timeout is not None:
                client_call_details = grpc.aio.ClientCallDetails(
                    client_call_details.method,
                    timeout,
                    client_call_details.metadata,
                    client_call_details.credentials,
                    client_call_details.wait_for_ready,
                )
        return await continuation(client_call_details, request)


def insecure_channel(
    target: str,
    *,
    config: dict[str, Any] | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """A plaintext channel with the recommended service config (for local
    use); `interceptors` (a consistency Session) run inside the default
    timeouts."""
    config = service_config() if config is None else config
    return grpc.aio.insecure_channel(
        target,
        options=[*channel_options(config), *options],
        # grpc-stubs wants a cast for interceptor lists.
        interceptors=[cast(Any, DefaultTimeouts(config)), *interceptors],
    )


def secure_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    *,
    config: dict[str, Any] | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """A TLS channel (system roots unless `credentials` says otherwise)."""
    config = service_config() if config is None else config
    return grpc.aio.secure_channel(
        target,
        credentials or grpc.ssl_channel_credentials(),
        options=[*channel_options(config), *options],
        # grpc-stubs wants a cast for interceptor lists.
        interceptors=[cast(Any, DefaultTimeouts(config)), *interceptors],
    )


def bearer(token: str) -> list[tuple[str, str]]:
    """Call metadata that authenticates with an access token from Login."""
    return [("authorization", f"Bearer {token}")]


def new_request_id() -> str:
    """A fresh idempotency key: reuse it for every retry of the same transition."""
    return str(uuid.uuid4())
