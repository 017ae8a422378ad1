"""A real webhook receiver for the tests: an HTTP/1.1 server on 127.0.0.1
(a free port) that verifies every request's signature with the
`standardwebhooks` package, as a receiving backend would, and records it.

Each path is one endpoint; `behaviour` decides the answer to each request
(a status code, after whatever waiting it likes)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Request:
    path: str
    msg_id: str
    headers: dict[str, str]
    body: dict[str, Any]
    # Indexes (in Receiver.secrets[path]) of the secrets whose signature verified.
    verified: list[int]
    status: int = 0


Behaviour = Callable[[Request, int], Awaitable[int]]


async def always_ok(_: Request, __: int) -> int:
    return 200


@dataclass
class Receiver:
    port: int = 0
    secrets: dict[str, list[str]] = field(default_factory=dict)
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    requests: dict[str, list[Request]] = field(default_factory=dict)
    unverified: list[Request] = field(default_factory=list)
    inflight: dict[str, int] = field(default_factory=dict)
    max_inflight: dict[str, int] = field(default_factory=dict)
    # Across every path: requests the receiver is working on at once.
    total_inflight: int = 0
    max_total_inflight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self, path: str) -> list[Request]:
        return [r for r in self.requests.get(path, []) if 200 <= r.status < 300]

    def first_arrivals(self, path: str) -> list[str]:
        """Event ids in the order each was first accepted (duplicates dropped)."""
        seen: dict[str, None] = {}
        for r in self.accepted(path):
            seen.setdefault(r.msg_id, None)
        return list(seen)

    async def wait(self, predicate: Callable[[], bool], within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the receiver never saw what the test waits for"
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = ""
        counted = False
        try:
            line = await reader.readuntil(b"\r\n")
            method, path, _ = line.decode().split(" ")
            headers: dict[str, str] = {}
            while (raw := await reader.readuntil(b"\r\n")) != b"\r\n":
                key, _, value = raw.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.inflight[path] = self.inflight.get(path, 0) + 1
            counted = True
            self.max_inflight[path] = max(self.max_inflight.get(path, 0), self.inflight[path])
            self.total_inflight += 1
            self.max_total_inflight = max(self.max_total_inflight, self.total_inflight)
            verified = []
            for i, secret in enumerate(self.secrets.get(path, [])):
                with contextlib.suppress(WebhookVerificationError):
                    Webhook(secret).verify(body, headers)
                    verified.append(i)
            request = Request(
                path, headers.get("webhook-id", ""), headers, json.loads(body), verified
            )
            seen = self.requests.setdefault(path, [])
            seen.append(request)
            if method != "POST" or not verified:
                self.unverified.append(request)
                request.status = 401
            else:
                request.status = await self.behaviour.get(path, always_ok)(request, len(seen) - 1)
            self.changed.set()
            writer.write(f"HTTP/1.1 {request.status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if counted:
                self.inflight[path] -= 1
                self.total_inflight -= 1
            writer.close()
            self.changed.set()


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    server = await asyncio.start_server(receiver._handle, "127.0.0.1", 0)
    receiver.port = int(server.sockets[0].getsockname()[1])
    try:
        yield receiver
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
