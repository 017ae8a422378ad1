"""The error contract between the SQL functions and Python.

A business failure in storage/sql/ is `booking_fail('REASON', jsonb_build_object(
'key', value, …))`; storage/ builds the domain error named for REASON in
storage.errors.SQL_REASONS from those keys. These tests read every such call
in the SQL source and require a class for each reason whose fields are
exactly the keys sent, so neither side can change alone.
"""

from __future__ import annotations

import dataclasses
import json
import re

import asyncpg
import pytest

from storage import errors, schema
from storage.errors import translate

_FAIL = re.compile(
    r"booking_fail\(\s*'(?P<reason>[A-Z_]+)'\s*,\s*jsonb_build_object\((?P<args>.*?)\)\s*\);",
    re.S,
)


def _sql_failures() -> list[tuple[str, frozenset[str]]]:
    found = []
    for match in _FAIL.finditer(schema.source_sql()):
        # Values are variables and expressions; every quoted literal is a key.
        keys = frozenset(re.findall(r"'(\w+)'", match["args"]))
        found.append((match["reason"], keys))
    return found


def _fields(cls: type[errors.BookingError]) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def test_the_sql_source_raises_business_failures() -> None:
    # The parser below must see the calls, or the contract checks nothing.
    assert len(_sql_failures()) >= 15


@pytest.mark.parametrize(("reason", "keys"), sorted(set(_sql_failures())))
def test_every_sql_failure_maps_to_an_error_with_exactly_its_keys(
    reason: str, keys: frozenset[str]
) -> None:
    cls = errors.SQL_REASONS.get(reason)
    assert cls is not None, f"SQL raises {reason}, which storage.errors.SQL_REASONS lacks"
    assert cls.reason == reason
    assert _fields(cls) == keys, (
        f"{reason}: SQL sends {sorted(keys)}, {cls.__name__} takes {sorted(_fields(cls))}"
    )


def test_every_sql_reason_class_is_raised_by_the_sql() -> None:
    raised = {reason for reason, _ in _sql_failures()}
    assert set(errors.SQL_REASONS) == raised


@pytest.mark.parametrize(("reason", "keys"), sorted(set(_sql_failures())))
def test_a_failure_from_the_database_becomes_its_domain_error(
    reason: str, keys: frozenset[str]
) -> None:
    # The same path storage/database.py takes for a real BK001 error.
    exc = asyncpg.PostgresError.new(
        {
            "C": "BK001",
            "M": reason,
            "D": json.dumps({key: f"value-{key}" for key in sorted(keys)}),
            "S": "ERROR",
        }
    )
    domain = translate(exc)
    assert type(domain) is errors.SQL_REASONS[reason]
    assert domain.metadata() == {key: f"value-{key}" for key in keys}


def _domain_errors() -> set[type[errors.BookingError]]:
    # Importing the service layer registers its errors (InvalidArgument, …).
    import service.errors  # noqa: F401

    found: set[type[errors.BookingError]] = set()
    todo = [errors.BookingError]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found


def test_every_domain_error_has_exactly_one_grpc_code() -> None:
    from service.errors import CODES

    for cls in _domain_errors():
        entries = [base for base in cls.__mro__ if base in CODES]
        assert len(entries) == 1, f"{cls.__name__}: codes from {entries}"


def test_error_reasons_are_unique_and_well_formed() -> None:
    # Abstract bases (NotFound) name no reason of their own.
    named = [cls for cls in _domain_errors() if "reason" in vars(cls)]
    reasons = [cls.reason for cls in named]
    assert len(reasons) == len(set(reasons)), sorted(reasons)
    for reason in reasons:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,62}", reason), reason
