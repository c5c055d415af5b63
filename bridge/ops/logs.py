"""Logging setup: one JSON object per line for machines, plain text for a terminal.

Callers attach structured fields with `extra={"fields": {...}}`; tokens and
request bodies are never among them.

Lines are written by a background thread, never by the event loop: a log call only
puts the record on a bounded queue (`BackgroundLogHandler`). A stderr pipe that stalls
(a full pipe, a slow log collector) therefore cannot stall callbacks; when the queue is
full the line is dropped and counted (`luma_bridge_log_lines_dropped_total`), so memory
stays bounded. Closing the handler (`logging.shutdown()`, which runs at exit) writes
every queued line before it returns.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.settings import LogFormat, LogLevel

FIELDS = "fields"
#: Lines waiting for the writer thread. A callback line is ~0.5 KB (with its record, ~2 KB
#: of memory), so a full queue holds about 20 MB: minutes of a stalled pipe at normal rates.
DEFAULT_QUEUE_LINES = 10_000
#: How long closing waits for a stalled stream to take the queued lines before giving up.
CLOSE_TIMEOUT_SECONDS = 5.0


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, FIELDS, {}))
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # orjson: the per-callback line is on the hot path (~25x faster than json.dumps).
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time level logger message key=value ...` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, FIELDS, {})
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


class _Listener(logging.handlers.QueueListener):
    """The writer thread. Its stop waits for room for the sentinel instead of raising Full."""

    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel, timeout=CLOSE_TIMEOUT_SECONDS)  # type: ignore[attr-defined]


class BackgroundLogHandler(logging.handlers.QueueHandler):
    """Hands records to a writer thread through a bounded queue; never blocks the caller.

    A record that finds the queue full is dropped and counted in `dropped` (and in the
    counter given to `count_drops`). `close()` writes what is queued, waiting at most
    `CLOSE_TIMEOUT_SECONDS` for a stalled stream, then closes `target`.
    """

    def __init__(self, target: logging.Handler, *, capacity: int = DEFAULT_QUEUE_LINES) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._lines: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=capacity)
        super().__init__(self._lines)
        self.target = target
        self.dropped = 0
        self._on_drop: Callable[[], None] | None = None
        self._drop_lock = threading.Lock()
        self._listener: _Listener | None = _Listener(self._lines, target)
        self._listener.start()

    def count_drops(self, on_drop: Callable[[], None] | None) -> None:
        """Call `on_drop` once per dropped line from now on, and once per line dropped so far."""
        with self._drop_lock:
            self._on_drop = on_drop
            earlier = self.dropped if on_drop is not None else 0
        for _ in range(earlier):
            on_drop()  # type: ignore[misc]  # not None when earlier > 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Formatting happens on the writer thread; only what may change later is fixed
        # here: the message's arguments and the traceback (its frames live on).
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self._lines.put_nowait(record)
        except queue.Full:
            with self._drop_lock:
                self.dropped += 1
                on_drop = self._on_drop
            if on_drop is not None:
                on_drop()

    def flush(self) -> None:
        """Wait (at most `CLOSE_TIMEOUT_SECONDS`) until the queued lines are written."""
        deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS
        while self._listener is not None and self._lines.unfinished_tasks:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.005)
        self.target.flush()

    def close(self) -> None:
        """Write every queued line, stop the writer thread, close the target. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # A stream stalled for CLOSE_TIMEOUT_SECONDS must not hang the exit.
            with contextlib.suppress(queue.Full):
                listener.enqueue_sentinel()
            thread = listener._thread
            if thread is not None:
                thread.join(CLOSE_TIMEOUT_SECONDS)
            listener._thread = None
            self.target.flush()
            self.target.close()
        super().close()


_TRACEBACKS = logging.Formatter()


def count_dropped_lines(on_drop: Callable[[], None] | None) -> None:
    """Count the lines the root logger's background handler drops with `on_drop`
    (for example a metric's `inc`); `None` stops counting. No-op without one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundLogHandler):
            handler.count_drops(on_drop)


def configure_logging(
    level: LogLevel, log_format: LogFormat, *, queue_lines: int = DEFAULT_QUEUE_LINES
) -> BackgroundLogHandler:
    """Send every log line to stderr in the chosen format, from a background thread."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler = BackgroundLogHandler(stream, capacity=queue_lines)
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, BackgroundLogHandler):
            previous.close()  # configured twice (tests, `dev`): no second writer left running
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every failed reconnect at ERROR; ours say what it means.
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))
    return handler
