"""Logging set-up: human-readable lines by default, JSON with --log-json."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from service.request_context import RequestIdFilter

# Attributes every LogRecord has; anything else was passed as `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """One line per record; the call's request and trace ids at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            return line
        trace_id = getattr(record, "trace_id", None)
        return f"{line} [request_id={request_id}{f' trace_id={trace_id}' if trace_id else ''}]"


def configure(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # yoyo logs every step of every migration at INFO (about 60 lines on a
    # first start); the applied migrations are summed up by our own line.
    logging.getLogger("yoyo").setLevel(
        logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    )
