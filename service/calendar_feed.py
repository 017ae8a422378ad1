"""The calendar feed endpoint: GET /calendar/<token>.ics over plain HTTP/1.1
on a port of its own (--calendar-feed-port; off unless set).

A small asyncio server from the standard library: one request per
connection, GET and HEAD only, bounded request size and read time. The
answers never carry exception text: 400 for a malformed token, 404 for an
unknown, rotated or revoked one (and for every other path), 405 for other
methods, 503 while the database is unreachable, 500 (logged here) for
anything else. Tokens never appear in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from service import ical
from storage import feeds
from storage.database import Database
from storage.errors import DatabaseTimeout, DatabaseUnavailable, DeadlineExceeded

log = logging.getLogger(__name__)

PATH_PREFIX = "/calendar/"
# secrets.token_urlsafe(32): 43 characters of the URL-safe base64 alphabet.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_LINE = 8192
_MAX_HEADERS = 100
READ_TIMEOUT_SECONDS = 10.0
# Connections served at once; more are answered 503 at once, so slow or
# idle clients cannot pile up without bound.
MAX_CONNECTIONS = 256

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def feed_path(token: str) -> str:
    return f"{PATH_PREFIX}{token}.ics"


class CalendarFeedServer:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=_MAX_LINE, reuse_port=reuse_port or None
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                # Take what was sent first: closing on unread data resets
                # the connection before the client reads the answer.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(_MAX_LINE), 0.1)
                await _respond(writer, 503, b"busy, try again later\n")
                return
            try:
                async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                    method, target = await _read_request(reader)
            except TimeoutError:
                await _respond(writer, 408, b"request timeout\n")
                return
            except _BadRequest as bad:
                await _respond(writer, bad.status, bad.body)
                return
            status, body, content_type = await self._answer(method, target)
            await _respond(writer, status, body, content_type, head=method == "HEAD")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 - never reaches the client as text
            log.exception("calendar feed request failed")
            with contextlib.suppress(Exception):
                await _respond(writer, 500, b"internal error\n")
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, method: str, target: str) -> tuple[int, bytes, str]:
        plain = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", plain
        path = target.split("?", 1)[0]
        if not path.startswith(PATH_PREFIX):
            return 404, b"not found\n", plain
        name = path[len(PATH_PREFIX) :]
        if not name.endswith(".ics") or not _TOKEN.fullmatch(name[: -len(".ics")]):
            return 400, b"malformed feed token\n", plain
        try:
            feed = await feeds.read(self.db, name[: -len(".ics")])
        except (DatabaseUnavailable, DatabaseTimeout, DeadlineExceeded):
            return 503, b"database unavailable, try again later\n", plain
        if feed is None:
            return 404, b"not found\n", plain
        return 200, ical.render(feed), "text/calendar; charset=utf-8"


class _BadRequest(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, b"request line too long\n") from None
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, b"malformed request\n")
    for _ in range(_MAX_HEADERS):
        try:
            header = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, b"header too long\n") from None
        if header in (b"\r\n", b"\n"):
            return parts[0], parts[1]
    raise _BadRequest(431, b"too many headers\n")


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head: bool = False,
) -> None:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: private, no-cache",
        "Referrer-Policy: no-referrer",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()
