"""The booking-service command line: help for every flag, per-command flags,
--version, and `migrate list`."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import fields
from pathlib import Path

import pytest

from service import cli, logs
from service.config import Config, ConfigError, from_sources
from storage import migrate


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def _options(help_text: str) -> dict[str, str]:
    """Each long option of an argparse help page, and its description."""
    body = help_text.split("options:", 1)[1]
    out: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        match = re.match(r"^  (-\S.*?)(?:  +(\S.*))?$", line)
        if match:
            flags = re.findall(r"--[a-z][a-z0-9-]*", match.group(1))
            current = flags[0] if flags else match.group(1)
            out[current] = match.group(2) or ""
        elif current is not None and line.startswith("   "):
            out[current] += " " + line.strip()
    return out


def test_every_serve_flag_has_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    options = _options(_help(capsys, "serve"))
    expected = {"--" + f.name.replace("_", "-") for f in fields(Config)}
    assert expected <= set(options)
    for flag, text in options.items():
        description = text.split("; env ")[0]
        # More than the environment variable and the default.
        assert len(description.split()) >= 2 and not description.startswith("env "), (
            flag,
            text,
        )
    assert "GOAWAY" in options["--max-connection-age-seconds"]


@pytest.mark.parametrize(
    ("command", "own"),
    [
        ("migrate", {"--count", "--contract", "--batch-size"}),
        ("create-admin", {"--email", "--password-stdin"}),
    ],
)
def test_other_commands_list_only_their_own_flags(
    capsys: pytest.CaptureFixture[str], command: str, own: set[str]
) -> None:
    options = _options(_help(capsys, command))
    assert set(options) == {
        "--help",
        *own,
        "--database-url",
        "--data-dir",
        "--log-level",
        "--log-json",
    }
    assert all(text for text in options.values()), options


def test_version_comes_from_the_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"booking-service {importlib.metadata.version('booking-service')}"


def test_migrate_list_shows_applied_and_pending(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    monkeypatch.setattr(logs, "configure", lambda level, as_json: None)
    every = [name for name, _ in migrate.status(database_url)]
    [rolled] = migrate.rollback(database_url, 1)
    assert rolled == every[-1]
    assert cli.main(["migrate", "list", "--database-url", database_url]) == 0
    lines = capsys.readouterr().out.split("\n")
    listed = [line.split() for line in lines if line.strip()]
    contracts = set(migrate.contract_ids())
    assert listed == [
        ["applied" if name != rolled else "pending", name]
        + (["(contract)"] if name in contracts else [])
        for name in every
    ], lines


def test_migrate_apply_leaves_the_contract_step_to_its_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """An upgraded database gets the expand migrations from a plain apply
    (and from every replica starting); the contract migrations at the end of
    the chain wait for `migrate apply --contract`."""
    monkeypatch.setattr(logs, "configure", lambda level, as_json: None)
    every = [name for name, _ in migrate.status(database_url)]
    contract = [m for m in every if m in set(migrate.contract_ids())]
    assert contract and contract[-1] == every[-1]
    # Back to the schema before this release: the chain's tail is this
    # release's expand migrations, then its contract.
    since = every.index("0012.history-indexes") + 1
    migrate.rollback(database_url, len(every) - since)
    assert cli.main(["migrate", "apply", "--database-url", database_url]) == 0
    out = capsys.readouterr().out
    expand = [m for m in every[since:] if m not in contract]
    assert f"applied: {', '.join(expand)}" in out and contract[-1] in out, out
    assert migrate.applied(database_url) == [m for m in every if m not in contract]
    assert cli.main(["migrate", "apply", "--contract", "--database-url", database_url]) == 0
    assert contract[-1] in capsys.readouterr().out
    assert migrate.applied(database_url) == every


def test_environment_values_are_parsed_by_each_fields_type() -> None:
    config = from_sources(
        None,
        {
            "BOOKING_PORT": "0",
            "BOOKING_LOG_JSON": "yes",
            "BOOKING_HOLD_TTL_SECONDS": "1.5",
            "BOOKING_METRICS_PORT": "",
            "BOOKING_MAX_CONNECTION_AGE_GRACE_SECONDS": "2.5",
            "BOOKING_DATA_DIR": "/tmp/somewhere",
            "DATABASE_URL": "",
        },
    )
    assert config.port == 0 and config.log_json is True and config.hold_ttl_seconds == 1.5
    assert config.metrics_port is None and config.database_url is None
    assert config.max_connection_age_grace_seconds == 2.5
    assert config.data_dir == Path("/tmp/somewhere")
    with pytest.raises(ConfigError, match="BOOKING_PORT"):
        from_sources(None, {"BOOKING_PORT": "eighty"})
    with pytest.raises(ConfigError, match="BOOKING_LOG_JSON"):
        from_sources(None, {"BOOKING_LOG_JSON": "maybe"})
