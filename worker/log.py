"""One logging set-up for every process: structlog, JSON or console, stdlib routed through it.

Every line passes ``_scrub``: a ``code`` field never leaves the process and a
``destination`` is masked, whoever logged it.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import sys
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor

from worker.masking import mask_destination

LogFormat = Literal["json", "console", "auto"]

_SECRET_FIELDS = frozenset({"code", "sealed_code", "secret_key", "delivery_key", "password"})


def _scrub(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for name in _SECRET_FIELDS.intersection(event_dict):
        event_dict[name] = "[redacted]"
    destination = event_dict.get("destination")
    if isinstance(destination, str):
        event_dict["destination"] = mask_destination(destination)
    return event_dict


def _json_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class _Lines:
    """structlog's logger for a stream: info and debug lines are only written; warnings and
    worse are flushed at once. See ``configure(buffered=True)``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")

    def urgent(self, message: str) -> None:
        self._stream.write(message + "\n")
        self._stream.flush()

    debug = info = msg
    warn = warning = error = err = critical = exception = fatal = urgent


_out: TextIO | None = None


def flush() -> None:
    """Writes out buffered log lines (the worker calls it after every batch)."""
    if _out is not None:
        _out.flush()


def configure(
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    buffered: bool = False,
) -> None:
    """``buffered``: one write per batch instead of one per line. stderr is line-buffered,
    so a line per command cost a system call each, about a tenth of the worker's time at full
    load. Warnings and errors still go out at once; ``flush`` does the rest."""
    global _out
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    if buffered and fmt == "json":
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(os.dup(stream.fileno()), "w"), 1 << 16),
            encoding="utf-8",
            errors="replace",
        )
        atexit.register(stream.flush)
    _out = stream
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _scrub,
    ]
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_json_dumps)
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _Lines(stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Their debug lines carry message bodies and SQL parameters: never below INFO.
    for noisy in ("aio_pika", "aiormq", "aiosqlite", "asyncpg", "aiosmtplib"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.INFO))
    # httpx logs every request's full URL at INFO, and the SMS gateway URL is where its
    # credentials go (user:password@, ?apikey=): never below WARNING.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
