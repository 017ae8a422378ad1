"""Read-your-writes across calls and across replicas of the service.

Every write the service answers OK carries a consistency token in the
``x-booking-consistency-token`` trailer and in its response's
``consistency_token`` field. A read that sends it back is served
by a standby only once that standby has replayed past it, otherwise by the
primary. :class:`Session` does this for every call made through a channel
it intercepts: it keeps the tokens of the writes it saw and sends them with
each call, so a session reads its own writes and never goes back in time,
whichever replica of the service answers::

    session = Session()
    async with insecure_channel(target, interceptors=[session]) as channel:
        ...

Tokens are opaque: the session keeps the most recent few it received (the
service serves a read at least as new as the newest of them), so writes
answered out of order by concurrent calls still all count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

HEADER = "x-booking-consistency-token"
# The response field holding the same token (every write's response).
FIELD = "consistency_token"
# Tokens sent with each call: the newest among them is what counts, so a few
# cover writes of concurrent calls answered in any order.
KEEP = 8


class Session(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Propagates consistency tokens within one logical session."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self._tokens: deque[str] = deque(maxlen=KEEP)
        for token in tokens:
            self.observe(token)

    @property
    def tokens(self) -> Sequence[str]:
        """The tokens sent with the next call (oldest first); hand them to
        another session (another process) to carry the guarantee over."""
        return tuple(self._tokens)

    def observe(self, token: str) -> None:
        if token and token not in self._tokens:
            self._tokens.append(token)

    def metadata(self) -> list[tuple[str, str]]:
        return [(HEADER, token) for token in self._tokens]

    def take(self, trailers: Any) -> None:
        for key, value in trailers or ():
            if key == HEADER and isinstance(value, str):
                self.observe(value)

    def take_response(self, response: Any) -> None:
        """The token in a write's response field (the trailer's twin; a
        proxy that drops trailers still passes the message)."""
        fields = getattr(getattr(response, "DESCRIPTOR", None), "fields_by_name", None)
        if fields is not None and FIELD in fields:
            value = getattr(response, FIELD)
            if isinstance(value, str):
                self.observe(value)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        if self._tokens:
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                grpc.aio.Metadata(*(client_call_details.metadata or ()), *self.metadata()),
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        call = await continuation(client_call_details, request)
        try:
            response = await call
        except grpc.RpcError:
            return call  # the caller sees the failure; a failed call gives no token
        self.take_response(response)
        self.take(await call.trailing_metadata())
        return call
