"""Metrics (OpenTelemetry, served to Prometheus on --metrics-port) and
tracing (OpenTelemetry, exported when the standard OTEL_* variables ask
for it).

Both are off by default. Off, the instruments are the API's no-op ones
and the interceptor skips the per-call work (``Metrics.enabled``), and no
tracer is installed, so a call starts no span and parses no traceparent.

The gRPC server metrics carry the names grpc's own OpenTelemetry plugin
(grpcio-observability) uses, ``grpc.server.call.started`` and
``grpc.server.call.duration``, recorded by our interceptor: that plugin
pins an exact grpcio release older than the one the generated code needs.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

NAME = "booking-service"

# grpc's recommended boundaries for call durations (gRFC A66), in seconds.
DURATION_BUCKETS = (
    0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13,
    0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1, 2, 5, 10, 20, 50, 100,
)  # fmt: skip
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Webhook lag includes retries with backoff: minutes to hours.
WEBHOOK_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600)
# The reason labels of booking_webhooks_failures_total and _disabled_total
# (service/webhooks.py), exported as 0 from the start: a counter that appears
# only with its first increment hides that increment from rate() and
# increase(), so an alert on the first disabled endpoint would never fire.
WEBHOOK_FAILURE_REASONS = ("http_4xx", "http_5xx", "http_410", "timeout", "connection")
WEBHOOK_DISABLED_REASONS = ("FAILURES", "GONE", "COMPACTED")

# Method name -> transition label of booking_transitions_total.
TRANSITIONS = {
    "/booking.v1.AppointmentService/HoldSlot": "hold",
    "/booking.v1.AppointmentService/ConfirmAppointment": "confirm",
    "/booking.v1.AppointmentService/CancelAppointment": "cancel",
    "/booking.v1.AppointmentService/MarkNoShow": "no_show",
    "/booking.v1.AppointmentService/RescheduleAppointment": "reschedule",
}


class Metrics:
    """Every instrument the service records, from one meter."""

    def __init__(self, meter: Meter, *, enabled: bool) -> None:
        self.enabled = enabled
        self.meter = meter
        self.calls_started = meter.create_counter(
            "grpc.server.call.started", unit="{call}", description="Calls started, by method"
        )
        self.call_duration = meter.create_histogram(
            "grpc.server.call.duration",
            unit="s",
            description="Call duration from the handler's start to its end, by method and status",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.transitions = meter.create_counter(
            "booking.transitions",
            unit="{transition}",
            description="Appointment transitions requested, by transition and outcome"
            " (OK or the error reason)",
        )
        self.db_retries = meter.create_counter(
            "booking.db.retries",
            unit="{retry}",
            description="Transactions retried after a serialization failure, deadlock"
            " or key collision, by cause",
        )
        self.sweeper_released = meter.create_counter(
            "booking.sweeper.released", unit="{hold}", description="Lapsed holds released"
        )
        self.event_lag = meter.create_histogram(
            "booking.events.delivery_lag",
            unit="s",
            description="From an event's commit to its sending on a watch stream",
            explicit_bucket_boundaries_advisory=LAG_BUCKETS,
        )
        # Webhooks (service/webhooks.py).
        self.webhook_deliveries = meter.create_counter(
            "booking.webhooks.deliveries",
            unit="{delivery}",
            description="Webhook deliveries answered 2xx",
        )
        self.webhook_failures = meter.create_counter(
            "booking.webhooks.failures",
            unit="{attempt}",
            description="Webhook delivery attempts that failed, by reason"
            " (http_4xx, http_5xx, http_410, timeout, connection)",
        )
        self.webhook_disabled = meter.create_counter(
            "booking.webhooks.disabled",
            unit="{endpoint}",
            description="Webhook endpoints disabled, by reason (FAILURES, GONE, COMPACTED)",
        )
        self.webhook_lag = meter.create_histogram(
            "booking.webhooks.delivery_lag",
            unit="s",
            description="From an event's commit to its 2xx from a webhook endpoint",
            explicit_bucket_boundaries_advisory=WEBHOOK_LAG_BUCKETS,
        )
        if enabled:
            self.webhook_deliveries.add(0)
            for reason in WEBHOOK_FAILURE_REASONS:
                self.webhook_failures.add(0, {"reason": reason})
            for reason in WEBHOOK_DISABLED_REASONS:
                self.webhook_disabled.add(0, {"reason": reason})

    def observe(self, name: str, description: str, read: Callable[[], float]) -> None:
        """A gauge read at each scrape."""

        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read())]

        self.meter.create_observable_gauge(name, [callback], description=description)


_NOOP = Metrics(NoOpMeter(NAME), enabled=False)
_metrics = _NOOP


def metrics() -> Metrics:
    return _metrics


@dataclass
class MetricsEndpoint:
    port: int
    close: Callable[[], None]


def serve_metrics(
    host: str, port: int, gauges: Mapping[str, tuple[str, Callable[[], float]]]
) -> MetricsEndpoint:
    """Record metrics from now on and serve them at http://host:port/metrics
    (a thread of prometheus_client's); `gauges` are read at each scrape."""
    global _metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry, start_http_server

    # A registry of our own: a process may start more than one server (tests).
    registry = CollectorRegistry()
    # Without otel_scope_* labels: every metric here has the one scope.
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": NAME})
    )
    current = Metrics(provider.get_meter(NAME), enabled=True)
    for name, (description, read) in gauges.items():
        current.observe(name, description, read)
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    _metrics = current

    def close() -> None:
        global _metrics
        if _metrics is current:
            _metrics = _NOOP
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
        provider.shutdown()

    return MetricsEndpoint(port=httpd.server_port, close=close)


# --- tracing --------------------------------------------------------------

_tracer: Tracer | None = None
_propagator = TraceContextTextMapPropagator()

# Codes that mean the server failed (OpenTelemetry's semantic conventions
# for gRPC servers); the others are the client's outcome, not an error here.
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def tracer() -> Tracer | None:
    """The tracer when tracing is on, else None."""
    return _tracer


def use_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Trace with `provider` from now on (None: tracing off)."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer(NAME)


# OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL -> the module of its span exporter.
_OTLP_MODULES = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}


def _exporters(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = environ.get("OTEL_TRACES_EXPORTER")
    if named is not None:
        return [
            n.strip().lower() for n in named.split(",") if n.strip().lower() not in ("", "none")
        ]
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        return ["otlp"]
    return []


def tracing_from_env(environ: Mapping[str, str] | None = None) -> Callable[[], None] | None:
    """Install tracing if the OTEL_* variables ask for an exporter; returns
    the function that flushes and removes it, or None when tracing is off.

    The exporters are imported only here, so an installation without the
    `otlp` extra costs nothing until it is configured (and then says so)."""
    environ = os.environ if environ is None else environ
    names = _exporters(environ)
    if not names:
        return None
    unsupported = [n for n in names if n not in ("otlp", "console")]
    if unsupported:
        raise RuntimeError(
            f"OTEL_TRACES_EXPORTER {unsupported[0]!r} is not supported (otlp, console)"
        )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    # Sampling follows OTEL_TRACES_SAMPLER (default: parent-based, always on).
    provider = TracerProvider(resource=Resource.create({"service.name": NAME}))
    for name in names:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            protocol = environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            module_name = _OTLP_MODULES.get(protocol)
            if module_name is None:
                raise RuntimeError(f"OTLP protocol {protocol!r} is not supported")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise RuntimeError(
                    f"OTEL_* asks for OTLP over {protocol}, but {exc.name} is not installed"
                    " (pip install 'booking-service[otlp]')"
                ) from exc
            provider.add_span_processor(BatchSpanProcessor(module.OTLPSpanExporter()))
    use_tracer_provider(provider)
    log.info("tracing on: %s", ", ".join(names))

    def remove() -> None:
        use_tracer_provider(None)
        provider.shutdown()

    return remove


@dataclass
class RpcSpan:
    span: Span
    token: object

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def end(self, code_name: str) -> None:
        self.span.set_attribute("rpc.grpc.status_code", code_name)
        if code_name in _SERVER_ERRORS:
            self.span.set_status(Status(StatusCode.ERROR, code_name))
        self.span.end()
        with contextlib.suppress(ValueError):
            otel_context.detach(self.token)  # type: ignore[arg-type]


def start_rpc_span(method: str, metadata: Iterable[tuple[str, str | bytes]]) -> RpcSpan | None:
    """A server span for the call, child of the caller's traceparent (W3C
    trace context), made current; None when tracing is off."""
    if _tracer is None:
        return None
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    parent = _propagator.extract(carrier)
    service, _, name = method.lstrip("/").partition("/")
    span = _tracer.start_span(
        method.lstrip("/"),
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return RpcSpan(span, token)


@contextlib.contextmanager
def _db_span(tracer_: Tracer, work: Callable[..., Any], attempt: int) -> Iterator[None]:
    name = getattr(work, "__qualname__", "work").replace("<locals>.", "")
    with tracer_.start_as_current_span(
        f"postgresql {name}",
        kind=SpanKind.CLIENT,
        attributes={"db.system.name": "postgresql", "booking.db.attempt": attempt + 1},
    ):
        yield


def db_span(work: Callable[..., Any], attempt: int) -> contextlib.AbstractContextManager[None]:
    """A client span around one attempt of a transaction (Database.run),
    inside a call's span only: the background loops (sweeper, event tail)
    would otherwise start a trace of their own every few seconds."""
    if _tracer is None or not trace.get_current_span().is_recording():
        return contextlib.nullcontext()
    return _db_span(_tracer, work, attempt)
