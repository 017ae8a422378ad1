"""The database's source of truth: the SQL files in storage/sql/.

They describe the current schema, tables and functions, as a reader should
see it. Migrations (migrations/) are the changes that take an existing
database there; tests/test_schema_source.py builds one database from each
and fails on any difference, so the two can never drift apart.
"""

from __future__ import annotations

from pathlib import Path

# In dependency order: the users table needs booking_email_key, and SQL-language
# functions need the tables they read (plpgsql bodies are bound when first run).
SOURCE_FILES = (
    "email_key.sql",
    "tables.sql",
    "support.sql",
    "durability.sql",
    "requests.sql",
    "slots.sql",
    "policies.sql",
    "transitions.sql",
    "waitlist.sql",
    "seats.sql",
    "buffers.sql",
    "series.sql",
    "auth.sql",
    "contract.sql",
    "retention.sql",
    "schedules.sql",
    "feeds.sql",
    "webhooks.sql",
    "lease.sql",
)


def source_dir() -> Path:
    return Path(__file__).resolve().parent / "sql"


def source_sql() -> str:
    """The whole current schema as one script."""
    return "\n".join((source_dir() / name).read_text() for name in SOURCE_FILES)
