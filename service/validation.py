"""Request validation: everything a client can get wrong is caught here and
reported as INVALID_ARGUMENT with one field violation per problem, before
any database work.

A required id, text or email comes back typed as present (``UUID``, not
``UUID | None``): when it is missing or bad, the method records the violation
and returns a placeholder of the type, which nothing may use, because
:meth:`Validator.check` raises before the handler goes on. So a handler
validates every field, calls check() once, and uses the values without
asserting them. Values that later checks compare (timestamps, local times,
dates, enums, bounds) stay ``None`` when bad, so a bad field never adds a
second, misleading violation to another one."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Literal, TypeVar, overload
from uuid import UUID

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from service.errors import FieldViolation, InvalidArgument
from storage import wallclock

E = TypeVar("E")

# google.protobuf.Timestamp's documented range: 0001-01-01 .. 9999-12-31.
MIN_SECONDS = -62135596800
MAX_SECONDS = 253402300799

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# The placeholder of a required id that failed validation (see above).
_NO_UUID = UUID(int=0)


class Validator:
    """Collects violations so a client learns about every bad field at once."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def check(self) -> None:
        if self.violations:
            raise InvalidArgument(violations=list(self.violations))

    @overload
    def uuid(self, field: str, value: str, *, required: Literal[True] = ...) -> UUID: ...
    @overload
    def uuid(self, field: str, value: str, *, required: bool) -> UUID | None: ...
    def uuid(self, field: str, value: str, *, required: bool = True) -> UUID | None:
        if not value:
            if required:
                self.fail(field, "required")
            return _NO_UUID if required else None
        try:
            return UUID(value)
        except ValueError:
            self.fail(field, f"not a UUID: {value[:64]!r}")
            return _NO_UUID if required else None

    @overload
    def text(
        self, field: str, value: str, *, required: Literal[True] = ..., max_length: int = ...
    ) -> str: ...
    @overload
    def text(
        self, field: str, value: str, *, required: bool, max_length: int = ...
    ) -> str | None: ...
    def text(
        self, field: str, value: str, *, required: bool = True, max_length: int = 200
    ) -> str | None:
        missing = "" if required else None
        if "\x00" in value:
            self.fail(field, "must not contain NUL characters")
            return missing
        if not value.strip():
            if required:
                self.fail(field, "required")
            return missing
        if len(value) > max_length:
            self.fail(field, f"at most {max_length} characters")
            return missing
        return value

    @overload
    def email(self, field: str, value: str, *, required: Literal[True] = ...) -> str: ...
    @overload
    def email(self, field: str, value: str, *, required: bool) -> str | None: ...
    def email(self, field: str, value: str, *, required: bool = True) -> str | None:
        missing = "" if required else None
        errors = len(self.violations)
        text = self.text(field, value, required=required, max_length=254)
        if text is None or len(self.violations) > errors:
            return missing
        text = text.strip()
        local, at, domain = text.rpartition("@")
        if not at or not local or "." not in domain or any(c.isspace() for c in text):
            self.fail(field, "not an email address")
            return missing
        return text

    def timestamp(
        self, field: str, message: Message, name: str, *, required: bool
    ) -> datetime | None:
        if not message.HasField(name):
            if required:
                self.fail(field, "required")
            return None
        ts: Timestamp = getattr(message, name)
        if not MIN_SECONDS <= ts.seconds <= MAX_SECONDS or not 0 <= ts.nanos <= 999_999_999:
            self.fail(field, "outside 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z")
            return None
        return datetime.fromtimestamp(ts.seconds, tz=UTC).replace(microsecond=ts.nanos // 1000)

    def enum(
        self, field: str, value: int, mapping: Mapping[int, E], *, required: bool = False
    ) -> E | None:
        """Maps a wire enum to a domain value; 0 (UNSPECIFIED) means unset."""
        if value == 0:
            if required:
                self.fail(field, "required")
            return None
        if value not in mapping:
            self.fail(field, f"unknown value {value}")
            return None
        return mapping[value]

    def time_zone(self, field: str, value: str) -> str:
        """An IANA zone name the server's tz database knows; empty is UTC."""
        if not value:
            return "UTC"
        if not wallclock.valid_zone(value):
            self.fail(
                field,
                f"not an IANA time zone in tz database {wallclock.tz_version()}:"
                f" {value[:64]!r} (e.g. Europe/Berlin)",
            )
            return "UTC"
        return value

    def local_time(self, field: str, value: str, *, required: bool = True) -> int | None:
        """A local "HH:MM" as minutes after midnight; "24:00" is 1440."""
        if not value:
            if required:
                self.fail(field, "required")
            return None
        hours, sep, minutes = value.partition(":")
        if (
            sep
            and len(hours) == 2
            and len(minutes) == 2
            and all("0" <= c <= "9" for c in hours + minutes)
            and int(minutes) < 60
            and (int(hours) < 24 or value == "24:00")
        ):
            return int(hours) * 60 + int(minutes)
        self.fail(field, f"not a local time HH:MM (00:00 .. 24:00): {value[:32]!r}")
        return None

    def date(self, field: str, value: str, *, required: bool = True) -> date | None:
        """A "YYYY-MM-DD" calendar date."""
        if not value:
            if required:
                self.fail(field, "required")
            return None
        try:
            if len(value) != 10:
                raise ValueError(value)
            return date.fromisoformat(value)
        except ValueError:
            self.fail(field, f"not a date YYYY-MM-DD: {value[:32]!r}")
            return None

    def bounded(self, field: str, value: int, low: int, high: int) -> int | None:
        if not low <= value <= high:
            self.fail(field, f"must be {low} to {high}, not {value}")
            return None
        return value

    def page_size(self, value: int, field: str = "page_size") -> int:
        if value < 0:
            self.fail(field, "must not be negative")
            return DEFAULT_PAGE_SIZE
        if value == 0:
            return DEFAULT_PAGE_SIZE
        return min(value, MAX_PAGE_SIZE)

    def window(
        self, start: datetime | None, end: datetime | None, start_field: str, end_field: str
    ) -> None:
        if start is not None and end is not None and start >= end:
            self.fail(end_field, f"must be after {start_field}")


def field_mask_paths(paths: list[str], allowed: set[str], v: Validator) -> set[str]:
    if not paths:
        v.fail("update_mask", f"required; allowed paths: {', '.join(sorted(allowed))}")
    unknown = [p for p in paths if p not in allowed]
    if unknown:
        v.fail("update_mask", f"unknown paths {unknown}; allowed: {', '.join(sorted(allowed))}")
    return set(paths) & allowed
