"""Opaque page tokens (AIP-158).

A token holds the keyset position after the last item and a digest of the
filters it was issued for, so changing filters between pages is caught. It
is base64 of JSON, which clients must treat as opaque: it is a position in
an ordering, not an offset.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from service.errors import FieldViolation, InvalidArgument
from storage.models import Page

T = TypeVar("T")

_VERSION = 1


def _digest(filters: Any) -> str:
    blob = json.dumps(filters, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _bad(description: str) -> InvalidArgument:
    return InvalidArgument(violations=[FieldViolation("page_token", description)])


def encode(key: list[Any], filters: Any) -> str:
    payload = {"v": _VERSION, "k": [str(part) for part in key], "f": _digest(filters)}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def next_token(page: Page[T], key: Callable[[T], list[Any]], filters: Any) -> str:
    """The token for the page after `page`: empty on the last page."""
    if not page.has_more or not page.items:
        return ""
    return encode(key(page.items[-1]), filters)


def decode(token: str, filters: Any) -> list[str] | None:
    """The key parts stored in `token`, or None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        key = payload["k"]
        if payload.get("v") != _VERSION or not isinstance(key, list):
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _bad("not a page token issued by this service") from None
    if payload.get("f") != _digest(filters):
        raise _bad("the filters changed since this page token was issued")
    return [str(part) for part in key]


def time_and_id(token: str, filters: Any) -> tuple[datetime, UUID] | None:
    key = decode(token, filters)
    if key is None:
        return None
    try:
        when, ident = key
        moment = datetime.fromisoformat(when)
        # Tokens are only as trustworthy as the client that sends them: keep
        # the position to an instant PostgreSQL can compare.
        if moment.utcoffset() != timedelta(0):
            raise ValueError(when)
        return moment, UUID(ident)
    except ValueError:
        raise _bad("not a page token issued by this service") from None
