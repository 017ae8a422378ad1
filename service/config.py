"""Configuration: one typed object, built once at start-up from the
environment and command-line flags (flags win), and validated there."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    # Unset: start an embedded PostgreSQL with its data under data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".data")
    migrate_on_start: bool = True
    pool_min_size: int = 2
    pool_max_size: int = 10
    hold_ttl_seconds: float = 300.0
    sweep_interval_seconds: float = 5.0
    sweep_batch_size: int = 500
    check_user_overlap: bool = True
    # How long a request_id's outcome is remembered (docs/api.md); the
    # sweeper forgets older ones.
    request_id_retention_hours: float = field(
        default=24.0,
        metadata={"help": "how long a request_id's first outcome is replayed to retries"},
    )
    allow_self_signup: bool = True
    # Anonymous CreateUser calls one client address may make per minute, per
    # server: each costs an argon2 hash, and each answers whether an email
    # is registered (docs/auth.md).
    signups_per_minute: int = 10
    token_ttl_seconds: int = 3600
    # How long a server may reuse a token lookup; invalidated at once by
    # NOTIFY on any change (docs/auth.md). 0 looks every token up every time.
    token_cache_seconds: float = 30.0
    login_max_failures: int = 5
    login_lockout_seconds: int = 300
    max_streams: int = 1000
    heartbeat_seconds: float = 5.0
    event_poll_seconds: float = 0.5
    grace_seconds: float = 10.0
    # Server processes sharing the port through SO_REUSEPORT (Linux).
    workers: int = 1
    log_level: str = "INFO"
    log_json: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Off unless set; served on `host` (loopback by default), 0 picks a port.
    metrics_port: int | None = field(
        default=None,
        metadata={"help": "serve Prometheus metrics at http://HOST:PORT/metrics (off if unset)"},
    )

    @cached_property  # read on every HoldSlot
    def hold_ttl(self) -> timedelta:
        return timedelta(seconds=self.hold_ttl_seconds)

    @cached_property
    def request_id_retention(self) -> timedelta:
        return timedelta(hours=self.request_id_retention_hours)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def validate(self) -> Config:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be 0-65535, not {self.port}")
        if self.pool_min_size < 1 or self.pool_max_size < self.pool_min_size:
            problems.append("pool sizes need 1 <= pool_min_size <= pool_max_size")
        for name in (
            "hold_ttl_seconds",
            "sweep_interval_seconds",
            "heartbeat_seconds",
            "event_poll_seconds",
            "token_ttl_seconds",
            "login_lockout_seconds",
            "request_id_retention_hours",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("sweep_batch_size", "login_max_failures", "max_streams", "signups_per_minute"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.workers < 1:
            problems.append("workers must be at least 1")
        if self.workers > 1 and self.port == 0:
            problems.append("workers > 1 needs a fixed port, not 0")
        if self.token_cache_seconds < 0:
            problems.append("token_cache_seconds must not be negative")
        if self.grace_seconds < 0:
            problems.append("grace_seconds must not be negative")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                problems.append(f"{name}: no such file {path}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port must be 0-65535, not {self.metrics_port}")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


# Environment variable for each field; DATABASE_URL keeps its usual name.
def env_name(field: str) -> str:
    return "DATABASE_URL" if field == "database_url" else f"BOOKING_{field.upper()}"


def _parse(field_type: Any, raw: str, name: str) -> Any:
    text = raw.strip()
    try:
        if field_type in (bool, "bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if field_type in (int, "int"):
            return int(text)
        if field_type == "int | None":
            return int(text) if text else None
        if field_type in (float, "float"):
            return float(text)
        if "Path" in str(field_type):
            return Path(text) if text else None
        if text == "" and "None" in str(field_type):
            return None
        return text
    except ValueError:
        raise ConfigError(f"{name}: cannot parse {raw!r} as {field_type}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, e.g. --hold-ttl-seconds; unset flags fall back to
    the environment, then to the default."""
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"env {env_name(f.name)} (default: {f.default})"
        if "help" in f.metadata:
            help_text = f"{f.metadata['help']}; {help_text}"
        if f.type in (bool, "bool"):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar="VALUE", help=help_text)


def from_sources(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Config):
        flag_value = getattr(args, f.name, None) if args is not None else None
        if isinstance(flag_value, bool):
            values[f.name] = flag_value
        elif flag_value is not None:
            values[f.name] = _parse(f.type, flag_value, "--" + f.name.replace("_", "-"))
        elif env_name(f.name) in environ:
            values[f.name] = _parse(f.type, environ[env_name(f.name)], env_name(f.name))
    return Config(**values).validate()
