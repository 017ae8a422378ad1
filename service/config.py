"""Configuration: one typed object, built once at start-up from the
environment and command-line flags (flags win), and validated there. Each
field's --help text is its ``metadata["help"]``, the one place it is
written; values are parsed by the field's resolved type."""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from storage import hosts, replicas


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to listen on (:: or 0.0.0.0 for every interface)"},
    )
    port: int = field(default=50051, metadata={"help": "port to listen on; 0 picks a free one"})
    # Unset: start an embedded PostgreSQL with its data under data_dir.
    database_url: str | None = field(
        default=None,
        metadata={"help": "PostgreSQL URL; unset starts an embedded PostgreSQL under --data-dir"},
    )
    # Reads from standbys (docs/reads.md). Unset: everything on the primary.
    read_database_url: str | None = field(
        default=None,
        metadata={
            "help": "PostgreSQL URL of the hot standbys that serve reads (several hosts,"
            " or one HAProxy port on Patroni's replica check); unset: reads on the primary"
        },
    )
    reads_on_primary: bool = field(
        default=False,
        metadata={"help": "serve every read from the primary even if a read URL is set"},
    )
    read_max_lag_seconds: float = field(
        default=5.0,
        metadata={
            "help": "a standby whose replay is further behind than this serves no read"
            " without a consistency token"
        },
    )
    read_token_wait_seconds: float = field(
        default=0.5,
        metadata={
            "help": "how long a read with a consistency token waits for a standby to"
            " replay past it before the primary serves it"
        },
    )
    read_check_seconds: float = field(
        default=0.5,
        metadata={
            "help": "how long one standby may take to connect and report its replay"
            " position before the read moves on"
        },
    )
    data_dir: Path = field(
        default=Path(".data"), metadata={"help": "where the embedded PostgreSQL keeps its data"}
    )
    migrate_on_start: bool = field(
        default=True, metadata={"help": "apply pending schema migrations at start-up"}
    )
    pool_min_size: int = field(default=2, metadata={"help": "database connections kept open"})
    pool_max_size: int = field(default=10, metadata={"help": "most database connections at once"})
    commit_clock_tolerance_ms: int = field(
        default=1000,
        metadata={
            "help": "clock skew allowed between this host and the database's: each write"
            " transaction must reach its commit by the caller's time bound (at most 10 s)"
            " plus this, by the database's clock, or it is refused (UNAVAILABLE, retried);"
            " 0-5000 (docs/cluster.md, 'A resumed old primary')"
        },
    )
    hold_ttl_seconds: float = field(
        default=300.0,
        metadata={"help": "how long a HELD slot stays held before the sweeper releases it"},
    )
    # How long a waiter has to confirm a slot the waitlist offers (docs/waitlist.md):
    # longer than a hold, since the user must first hear of it.
    waitlist_offer_ttl_seconds: float = field(
        default=900.0,
        metadata={
            "help": "how long a slot offered to a waitlist entry stays held for its user;"
            " an entry keeps the value in force when it was created"
        },
    )
    sweep_interval_seconds: float = field(
        default=5.0, metadata={"help": "how often lapsed holds are released"}
    )
    sweep_batch_size: int = field(
        default=500, metadata={"help": "most holds released per sweep transaction"}
    )
    check_user_overlap: bool = field(
        default=True, metadata={"help": "refuse a user two appointments that overlap in time"}
    )
    # How long a request_id's outcome is remembered (docs/api.md); the
    # sweeper forgets older ones.
    request_id_retention_hours: float = field(
        default=24.0,
        metadata={"help": "how long a request_id's first outcome is replayed to retries"},
    )
    # 0 keeps every event. In production about a week (168) leaves
    # consumers time to come back from an outage (docs/events.md, "Retention").
    event_retention_hours: float = field(
        default=0.0,
        metadata={
            "help": "how long appointment events are kept before the sweeper prunes them;"
            " 0 keeps them forever"
        },
    )
    # One MaterializeSchedule call's bound (docs/schedules.md): a longer
    # range is INVALID_ARGUMENT, more slots RESOURCE_EXHAUSTED.
    schedule_max_days: int = field(
        default=92,
        metadata={"help": "most days one MaterializeSchedule call may cover"},
    )
    schedule_max_slots: int = field(
        default=5000,
        metadata={"help": "most slots one MaterializeSchedule call may lay out"},
    )
    # One HoldSeries call's bounds (docs/seats.md): more occurrences is
    # RESOURCE_EXHAUSTED, a longer span INVALID_ARGUMENT.
    series_max_occurrences: int = field(
        default=52,
        metadata={"help": "most occurrences one HoldSeries call may hold"},
    )
    series_max_days: int = field(
        default=366,
        metadata={"help": "most days from a series' first occurrence to its last"},
    )
    allow_self_signup: bool = field(
        default=True, metadata={"help": "let anonymous callers create CLIENT users"}
    )
    # Anonymous CreateUser calls one client address may make per minute, per
    # server: each costs an argon2 hash, and each answers whether an email
    # is registered (docs/auth.md).
    signups_per_minute: int = field(
        default=10, metadata={"help": "anonymous sign-ups one client address may make per minute"}
    )
    token_ttl_seconds: int = field(default=3600, metadata={"help": "lifetime of an access token"})
    # How long a server may reuse a token lookup; invalidated at once by
    # NOTIFY on any change (docs/auth.md). 0 looks every token up every time.
    token_cache_seconds: float = field(
        default=30.0,
        metadata={"help": "how long a token lookup may be reused; 0 looks up every call"},
    )
    login_max_failures: int = field(
        default=5, metadata={"help": "failed logins before an account is locked out"}
    )
    login_lockout_seconds: int = field(default=300, metadata={"help": "how long a lockout lasts"})
    max_streams: int = field(
        default=1000, metadata={"help": "most event streams open at once per server"}
    )
    heartbeat_seconds: float = field(
        default=5.0, metadata={"help": "interval of heartbeats on an idle event stream"}
    )
    event_poll_seconds: float = field(
        default=0.5, metadata={"help": "how often the event reader polls when no NOTIFY arrives"}
    )
    # LISTEN is refused on a standby: with reads on standbys, streams wake
    # when the replay position moves (docs/events.md, "Reading from a standby").
    event_replay_poll_seconds: float = field(
        default=0.01,
        metadata={
            "help": "with reads on standbys, how often the event reader looks at the"
            " standby's replay position to wake streams"
        },
    )
    grace_seconds: float = field(
        default=10.0, metadata={"help": "on SIGTERM, how long in-flight calls get to finish"}
    )
    # Server processes sharing the port through SO_REUSEPORT (Linux).
    workers: int = field(
        default=1, metadata={"help": "server processes sharing the port (SO_REUSEPORT, Linux)"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_json: bool = field(default=False, metadata={"help": "log one JSON object per line"})
    tls_cert: Path | None = field(
        default=None, metadata={"help": "PEM certificate chain; with --tls-key serves TLS"}
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: Path | None = field(
        default=None,
        metadata={"help": "PEM CA bundle; clients must present a certificate it signed (mTLS)"},
    )
    # Connections (docs in README "Operating it"): grpc's own default refuses
    # client pings more often than every 5 minutes with GOAWAY too_many_pings.
    keepalive_min_ping_seconds: float = field(
        default=10.0,
        metadata={"help": "shortest interval between client keepalive pings the server accepts"},
    )
    keepalive_permit_without_calls: bool = field(
        default=True,
        metadata={"help": "accept keepalive pings on a connection with no call in flight"},
    )
    max_connection_age_seconds: float = field(
        default=1800.0,
        metadata={
            "help": "close connections (GOAWAY) after this long so clients rebalance; 0 = never"
        },
    )
    max_connection_age_grace_seconds: float | None = field(
        default=None,
        metadata={
            "help": "how long calls may finish on a connection past its age; unset = grace-seconds"
        },
    )
    # Off unless set; served on `host` (loopback by default), 0 picks a port.
    metrics_port: int | None = field(
        default=None,
        metadata={"help": "serve Prometheus metrics at http://HOST:PORT/metrics (off if unset)"},
    )
    # Off unless set; served on `host`, 0 picks a port (docs/operations.md).
    calendar_feed_port: int | None = field(
        default=None,
        metadata={
            "help": "serve calendar feeds at http://HOST:PORT/calendar/TOKEN.ics (off if unset)"
        },
    )
    # The webhook dispatcher (docs/operations.md, "Webhooks").
    webhooks: bool = field(
        default=True,
        metadata={"help": "deliver events to the registered webhook endpoints"},
    )
    webhook_poll_seconds: float = field(
        default=1.0,
        metadata={"help": "how often the dispatcher looks for endpoints with events to deliver"},
    )
    webhook_concurrency: int = field(
        default=8,
        metadata={"help": "most endpoints one server delivers to at once"},
    )
    webhook_timeout_seconds: float = field(
        default=10.0,
        metadata={"help": "how long one delivery may take before it counts as failed"},
    )
    webhook_lease_seconds: float = field(
        default=30.0,
        metadata={
            "help": "how long a server holds an endpoint without renewing; at least"
            " twice webhook-timeout-seconds plus 2"
        },
    )
    webhook_max_failures: int = field(
        default=10,
        metadata={"help": "failed deliveries in a row after which an endpoint is disabled"},
    )
    webhook_backoff_max_seconds: float = field(
        default=300.0,
        metadata={"help": "longest wait between retries (exponential from 1 s, with jitter)"},
    )

    @cached_property  # read on every HoldSlot
    def hold_ttl(self) -> timedelta:
        return timedelta(seconds=self.hold_ttl_seconds)

    @cached_property
    def waitlist_offer_ttl(self) -> timedelta:
        return timedelta(seconds=self.waitlist_offer_ttl_seconds)

    @cached_property
    def request_id_retention(self) -> timedelta:
        return timedelta(hours=self.request_id_retention_hours)

    @cached_property
    def event_retention(self) -> timedelta | None:
        if self.event_retention_hours == 0:
            return None
        return timedelta(hours=self.event_retention_hours)

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
            "waitlist_offer_ttl_seconds",
            "sweep_interval_seconds",
            "heartbeat_seconds",
            "event_poll_seconds",
            "event_replay_poll_seconds",
            "token_ttl_seconds",
            "login_lockout_seconds",
            "request_id_retention_hours",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not 0 <= self.commit_clock_tolerance_ms <= 5000:
            problems.append("commit_clock_tolerance_ms must be 0-5000")
        if self.waitlist_offer_ttl_seconds > 7 * 86400:
            problems.append("waitlist_offer_ttl_seconds must be at most a week (604800)")
        if self.event_retention_hours < 0:
            problems.append("event_retention_hours must not be negative")
        for name in (
            "sweep_batch_size",
            "login_max_failures",
            "max_streams",
            "signups_per_minute",
            "schedule_max_days",
            "schedule_max_slots",
            "series_max_occurrences",
            "series_max_days",
        ):
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
        for name in ("max_connection_age_seconds", "max_connection_age_grace_seconds"):
            if (getattr(self, name) or 0) < 0:
                problems.append(f"{name} must not be negative")
        if self.keepalive_min_ping_seconds <= 0:
            problems.append("keepalive_min_ping_seconds must be positive")
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
        if self.calendar_feed_port is not None and not 0 <= self.calendar_feed_port <= 65535:
            problems.append(f"calendar_feed_port must be 0-65535, not {self.calendar_feed_port}")
        for name in (
            "webhook_poll_seconds",
            "webhook_timeout_seconds",
            "webhook_backoff_max_seconds",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("webhook_concurrency", "webhook_max_failures"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.webhook_lease_seconds < 2 * self.webhook_timeout_seconds + 2:
            problems.append(
                "webhook_lease_seconds must be at least 2 * webhook_timeout_seconds + 2"
            )
        if self.read_database_url is not None:
            try:
                hosts.parse(self.read_database_url)
            except ValueError as exc:
                problems.append(f"read_database_url: {exc}")
        if self.read_max_lag_seconds < 0:
            problems.append("read_max_lag_seconds must not be negative")
        if self.read_token_wait_seconds < 0:
            problems.append("read_token_wait_seconds must not be negative")
        if self.read_check_seconds <= 0:
            problems.append("read_check_seconds must be positive")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    @property
    def reads(self) -> replicas.Settings | None:
        """Where Intent.READ calls go: None keeps them on the primary."""
        if not self.read_database_url or self.reads_on_primary:
            return None
        return replicas.Settings(
            url=self.read_database_url,
            max_lag_seconds=self.read_max_lag_seconds,
            token_wait_seconds=self.read_token_wait_seconds,
            check_seconds=self.read_check_seconds,
            pool_max_size=self.pool_max_size,
        )


# Environment variable for each field; DATABASE_URL keeps its usual name.
def env_name(field: str) -> str:
    return "DATABASE_URL" if field == "database_url" else f"BOOKING_{field.upper()}"


# Each field's type, resolved (the annotations are strings here).
_TYPES: dict[str, Any] = typing.get_type_hints(Config)


def _parse(field_type: Any, raw: str, name: str) -> Any:
    """`raw` as a value of `field_type` (bool, int, float, str, Path, or one
    of them or None: empty is None)."""
    text = raw.strip()
    args = typing.get_args(field_type)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), field_type) if args else field_type
    try:
        if optional and not text:
            return None
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is Path:
            return Path(text) if text else None
        if base is str:
            return text
    except ValueError:
        raise ConfigError(f"{name}: cannot parse {raw!r} as {field_type}") from None
    raise TypeError(f"no parser for {name}: {field_type}")


# What the commands other than serve read of the configuration.
DATABASE_FIELDS = ("database_url", "data_dir", "log_level", "log_json")


def add_arguments(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """One flag per field (or per field in `only`), e.g. --hold-ttl-seconds;
    unset flags fall back to the environment, then to the default."""
    wanted = None if only is None else set(only)
    for f in fields(Config):
        if wanted is not None and f.name not in wanted:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"env {env_name(f.name)} (default: {f.default})"
        description = f.metadata.get("help")
        if description:
            help_text = f"{description}; {help_text}"
        if _TYPES[f.name] is bool:
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
            values[f.name] = _parse(_TYPES[f.name], flag_value, "--" + f.name.replace("_", "-"))
        elif env_name(f.name) in environ:
            values[f.name] = _parse(_TYPES[f.name], environ[env_name(f.name)], env_name(f.name))
    return Config(**values).validate()
