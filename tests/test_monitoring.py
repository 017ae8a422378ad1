"""The dashboards and alerts in deploy/monitoring: the rules pass
`promtool check rules` and their unit tests (`promtool test rules`, made-up
series), every panel's query is valid PromQL, and every metric a rule or a
panel names is exported by a running server, scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from booking.v1 import appointment_pb2 as apb
from booking.v1 import webhook_pb2 as wpb
from booking.v1 import webhook_pb2_grpc
from scripts import debian
from service import telemetry
from storage.database import Intent
from tests.support import Api, hours_from_now, running_server
from tests.webhook_receiver import new_secret, receiving

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "booking-rules.yml"
RULE_TESTS = MONITORING / "booking-rules.test.yml"
DASHBOARD = MONITORING / "booking-dashboard.json"

# Grafana's variables, as a query sees them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$job": ".+"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan", "le",
}  # fmt: skip


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool, from Debian's `prometheus` package (installed when missing)."""
    debian.ensure({"promtool": "prometheus"})
    found = shutil.which("promtool")
    assert found
    return found


def _promtool(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _panel_queries() -> list[str]:
    dashboard = _dashboard()
    queries = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+), *\w+\)", variable.get("definition", ""))
        if found:
            queries.append(found.group(1))
    filled = []
    for query in queries:
        for name, value in GRAFANA_VARIABLES.items():
            query = query.replace(name, value)
        filled.append(query)
    return filled


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: identifiers that are
    not functions, keywords, label names or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    # Grouping labels, with their keyword: `sum by (job) (x)` reads as `sum (x)`.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for found in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = found.group(0)
        if text[found.end() :].lstrip().startswith("(") or name in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'sum by (job, le) (rate(grpc_server_call_duration_seconds_bucket{grpc_method="a/B"}[5m]))'
        " / ignoring (grpc_status) group_left booking:x:ratio and on (job) booking_up > 0"
    )
    assert metric_names(expr) == {
        "grpc_server_call_duration_seconds_bucket",
        "booking:x:ratio",
        "booking_up",
    }


def test_the_rules_pass_promtool_check(promtool: str) -> None:
    out = _promtool(promtool, "check", "rules", RULES.name)
    assert f"SUCCESS: {len(_rules())} rules found" in out, out


def test_the_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    out = _promtool(promtool, "test", "rules", RULE_TESTS.name)
    assert "SUCCESS" in out, out
    # Every alert has a test where it fires.
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tested
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert firing == {r["alert"] for r in _rules() if "alert" in r}


def test_the_rule_tests_evaluate_recordings_before_the_alerts() -> None:
    # promtool evaluates groups in random order unless told; an alert that
    # reads a recording from another group then sees the step before's value,
    # and its test fails one run in eight.
    groups = [g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]]
    order = yaml.safe_load(RULE_TESTS.read_text())["group_eval_order"]
    assert sorted(order) == sorted(groups)
    recording = [g for g in order if g.endswith(".recording")]
    assert order[: len(recording)] == recording


def test_every_panel_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool has no PromQL checker of its own: each query becomes a
    # recording rule, which `promtool check rules` parses.
    queries = _panel_queries()
    assert len(queries) > 10
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_is_importable() -> None:
    dashboard = _dashboard()
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert dashboard["uid"] == "booking-service"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # Webhook delivery has a row of its own, with panels on the exported series.
    assert any("Webhook" in p["title"] for p in panels if p["type"] == "row")
    assert any("booking_webhooks_backlog_age_seconds" in q for q in _panel_queries())


def _named() -> tuple[set[str], set[str]]:
    """(metrics the service must export, recorded series) named by the
    rules and the dashboard."""
    recorded = {r["record"] for r in _rules() if "record" in r}
    names: set[str] = set()
    for expr in [r["expr"] for r in _rules()] + _panel_queries():
        names |= metric_names(expr)
    return names - recorded, recorded


def test_every_recorded_series_a_panel_or_alert_uses_is_recorded() -> None:
    exported, recorded = _named()
    assert not {n for n in exported if ":" in n}, "a series with a colon that no rule records"
    used = set()
    for expr in [r["expr"] for r in _rules() if "alert" in r] + _panel_queries():
        used |= metric_names(expr) & recorded
    assert used, "panels and alerts use the recorded series"


def _scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _scrape(port: int) -> set[str]:
    text = _scrape_text(port)
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _message(read: object) -> apb.WatchAppointmentEventsResponse:
    assert isinstance(read, apb.WatchAppointmentEventsResponse), read
    return read


async def test_webhook_series_are_exported_from_the_start(database_url: str) -> None:
    # No endpoint, no event: the backlog reads 0 and every failure and
    # disable reason is a 0 counter, so the first increase is seen by
    # rate() and increase() (BookingWebhookEndpointDisabled).
    async with running_server(database_url, metrics_port=0) as server:
        assert server.metrics_port is not None
        text = await asyncio.to_thread(_scrape_text, server.metrics_port)
    samples = {
        (s.name, s.labels.get("reason")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("booking_webhooks_")
    }
    expected: dict[tuple[str, str | None], float] = {
        ("booking_webhooks_backlog_age_seconds", None): 0.0,
        ("booking_webhooks_deliveries_total", None): 0.0,
        **{("booking_webhooks_failures_total", r): 0.0 for r in telemetry.WEBHOOK_FAILURE_REASONS},
        **{("booking_webhooks_disabled_total", r): 0.0 for r in telemetry.WEBHOOK_DISABLED_REASONS},
    }
    assert {k: v for k, v in samples.items() if not k[0].endswith("_created")} == expected


async def test_every_metric_a_rule_or_panel_names_is_exported(database_url: str) -> None:
    exported, _ = _named()
    assert {"booking_database_up", "grpc_server_call_duration_seconds_bucket"} <= exported
    async with (
        receiving() as receiver,
        running_server(
            database_url,
            metrics_port=0,
            hold_ttl_seconds=0.5,
            sweep_interval_seconds=0.1,
            webhook_poll_seconds=0.05,
        ) as server,
        Api.connect(server) as api,
    ):
        assert server.metrics_port is not None
        # Counters and histograms appear with their first event: a stream
        # that gets one, a hold that lapses, a retried transaction, and a
        # webhook delivery (the lag histogram).
        secret = new_secret()
        receiver.secrets["/monitoring"] = [secret]
        await webhook_pb2_grpc.WebhookServiceStub(api.channel).CreateWebhookEndpoint(
            wpb.CreateWebhookEndpointRequest(url=receiver.url("/monitoring"), secret=secret),
            metadata=api.md,
        )
        stream = api.appointments.WatchAppointmentEvents(
            apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_NOW),
            metadata=api.md,
        )
        assert _message(await stream.read()).HasField("heartbeat")
        specialist = await api.specialist()
        slot = await api.slot(specialist.id, hours_from_now(48))
        client, _ = await api.client()
        await client.hold(slot.id)
        while not _message(await stream.read()).HasField("event"):
            pass
        conflicts = iter([asyncpg.SerializationError("conflict"), None])

        async def work(conn: Any) -> int:
            exc = next(conflicts)
            if exc is not None:
                raise exc
            return int(await conn.fetchval("SELECT 1"))

        assert server.db is not None
        assert await server.db.run(work, intent=Intent.WRITE) == 1
        awaited = {"booking_sweeper_released_total", "booking_webhooks_delivery_lag_seconds_bucket"}
        deadline = time.monotonic() + 30
        while True:
            names = await asyncio.to_thread(_scrape, server.metrics_port)
            if awaited <= names or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        stream.cancel()
    missing = sorted(exported - names)
    assert not missing, f"named by a rule or panel but not exported: {missing}"
