"""Logging setup: one JSON object per line for machines, plain text for a terminal.

Callers attach structured fields with `extra={"fields": {...}}`; tokens and
request bodies are never among them.

Lines are written by a background thread, never by the event loop: a log call only
appends the record to a bounded buffer (`BackgroundLogHandler`). A stderr pipe that stalls
(a full pipe, a slow log collector) therefore cannot stall callbacks; when the queue is
full the line is dropped and counted (`luma_bridge_log_lines_dropped_total`), so memory
stays bounded. Closing the handler (`logging.shutdown()`, which runs at exit) writes
every queued line before it returns.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from bridge.settings import LogFormat, LogLevel

FIELDS = "fields"
#: Lines waiting for the writer thread. A callback line is ~0.5 KB (with its record, ~2 KB
#: of memory), so a full queue holds about 20 MB: minutes of a stalled pipe at normal rates.
DEFAULT_QUEUE_LINES = 10_000
#: How long closing waits for a stalled stream to take the queued lines before giving up.
CLOSE_TIMEOUT_SECONDS = 5.0
#: How often the writer thread writes what was logged: lines reach stderr this much later.
WRITE_INTERVAL_SECONDS = 0.05
#: A library line said again within this many seconds is held back (see `RepeatedLines`).
REPEAT_WINDOW_SECONDS = 10.0
#: Kinds of line `RepeatedLines` keeps track of at once.
MAX_KINDS = 1024
#: aiokafka's client logs each failed connection and metadata update at ERROR, and while
#: its only known broker refuses, with records waiting, it retries without pause: tens of
#: thousands of identical lines a minute were seen in an outage.
AIOKAFKA_CLIENT_LOGGER = "aiokafka"


class Line(NamedTuple):
    """A line logged with `log_line`: what the formatters print, without a `LogRecord`."""

    created: float
    levelno: int
    name: str
    message: str
    fields: dict[str, Any]

    def record(self) -> logging.LogRecord:
        """The `LogRecord` a `logger.log` call would have made (for a text formatter)."""
        record = logging.makeLogRecord(
            {"name": self.name, "levelno": self.levelno, "msg": self.message, FIELDS: self.fields}
        )
        record.levelname = logging.getLevelName(self.levelno)
        record.created = self.created
        return record


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(record.created, record.levelname, record.name, record.getMessage())
        entry.update(getattr(record, FIELDS, {}))
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # orjson: the per-callback line is on the hot path (~25x faster than json.dumps).
        return orjson.dumps(entry, default=str).decode()

    def format_line(self, line: Line) -> str:
        entry = _entry(line.created, logging.getLevelName(line.levelno), line.name, line.message)
        entry.update(line.fields)
        return orjson.dumps(entry, default=str).decode()


def _entry(created: float, level: str, name: str, message: str) -> dict[str, Any]:
    return {
        "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": name,
        "message": message,
    }


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


@dataclass(slots=True)
class _Run:
    """One kind of line: when its window ends, and how many were held back in it."""

    until: float
    held: int = 0


class RepeatedLines(logging.Filter):
    """Lets a logger's line through once per `window` seconds for each level and message
    template; the next one let through says how many like it were held back.

    For libraries that log the same complaint in a tight retry loop (aiokafka's client):
    the first line of an outage still shows at once, and one every `window` seconds
    while it lasts. The template is the unformatted message, so lines that differ only
    in their arguments (which node, which error) count as the same.
    """

    def __init__(
        self,
        window: float = REPEAT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._runs: dict[tuple[int, str], _Run] = {}  # by level and template

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, str(record.msg))
        now = self._clock()
        run = self._runs.get(key)
        if run is not None and now < run.until:
            run.held += 1
            return False
        if run is None and len(self._runs) >= MAX_KINDS:
            self._runs.clear()  # a logger that formats its own messages: bounded all the same
        self._runs[key] = _Run(until=now + self._window)
        if run is not None and run.held:
            record.msg = f"{record.msg} ({run.held} more like this since the last one shown)"
        return True


def collapse_repeated_lines(logger: logging.Logger) -> None:
    """Give `logger` one `RepeatedLines` filter (configuring twice does not add a second)."""
    for previous in [f for f in logger.filters if isinstance(f, RepeatedLines)]:
        logger.removeFilter(previous)
    logger.addFilter(RepeatedLines())


class BackgroundLogHandler(logging.Handler):
    """Hands records to a writer thread through a bounded buffer; never blocks the caller.

    The caller only appends the record to a deque: no lock and no thread wake-up per
    line, as the stdlib `QueueHandler`/`QueueListener` pair would take. The writer wakes
    every `interval` seconds, formats what is there with `target`'s formatter and writes
    it with one `write` and one `flush` (one system call per batch, not per line).
    A record that finds `capacity` records waiting is dropped and counted in `dropped`
    (and by the callback given to `count_drops`). `flush()` waits until what was logged
    before it is written; `close()` writes everything queued, waiting at most
    `CLOSE_TIMEOUT_SECONDS` for a stalled stream, then closes `target`.
    """

    def __init__(
        self,
        target: logging.StreamHandler[Any],
        *,
        capacity: int = DEFAULT_QUEUE_LINES,
        interval: float = WRITE_INTERVAL_SECONDS,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        super().__init__()
        self.target = target
        self.capacity = capacity
        self.dropped = 0
        self._interval = interval
        self._records: collections.deque[logging.LogRecord | Line] = collections.deque()
        self._on_drop: Callable[[], None] | None = None
        self._drop_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._writing = False
        self._writer: threading.Thread | None = threading.Thread(
            target=self._write_forever, name="log-writer", daemon=True
        )
        self._writer.start()

    def count_drops(self, on_drop: Callable[[], None] | None) -> None:
        """Call `on_drop` once per dropped line from now on, and once per line dropped so far."""
        with self._drop_lock:
            self._on_drop = on_drop
            earlier = self.dropped if on_drop is not None else 0
        if on_drop is not None:
            for _ in range(earlier):
                on_drop()

    def emit(self, record: logging.LogRecord) -> None:
        if not self._room():
            return
        # Formatting happens on the writer thread; only what may change later is fixed
        # here: the message's arguments and the traceback (its frames live on).
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        self._records.append(record)

    def queue_line(self, line: Line) -> None:
        """Queue a line made without a `LogRecord` (see `log_line`); dropped when full."""
        if self._room():
            self._records.append(line)

    def _room(self) -> bool:
        """Whether a line can be queued; when not (full, or closed), it counts as dropped."""
        if len(self._records) < self.capacity and self._writer is not None:
            return True
        self._drop()
        return False

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: the deque is the synchronisation (appends and pops are atomic).
        if self.filter(record):
            self.emit(record)
        return True

    def _drop(self) -> None:
        with self._drop_lock:
            self.dropped += 1
            on_drop = self._on_drop
        if on_drop is not None:
            on_drop()

    def _write_forever(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            self._write_queued()
            if self._closing and not self._records:
                return

    def _write_queued(self) -> None:
        self._writing = True
        try:
            lines: list[str] = []
            while self._records:
                item = self._records.popleft()
                try:
                    lines.append(self._format(item) + self.target.terminator)
                except Exception:
                    self.target.handleError(item.record() if isinstance(item, Line) else item)
            if lines:
                self._write_lines(lines)
        finally:
            self._writing = False

    def _format(self, item: logging.LogRecord | Line) -> str:
        if not isinstance(item, Line):
            return self.target.format(item)
        formatter = self.target.formatter
        if isinstance(formatter, JsonFormatter):
            return formatter.format_line(item)
        return self.target.format(item.record())

    def _write_lines(self, lines: list[str]) -> None:
        try:
            self.target.stream.write("".join(lines))
            self.target.flush()
        except Exception:
            # A closed or broken stream: nowhere to say so; the lines count as dropped.
            for _ in lines:
                self._drop()

    def flush(self) -> None:
        """Wait (at most `CLOSE_TIMEOUT_SECONDS`) until what was logged so far is written."""
        deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS
        while self._writer is not None and (self._records or self._writing):
            if time.monotonic() >= deadline or not self._writer.is_alive():
                return
            self._wake.set()
            time.sleep(0.001)

    def close(self) -> None:
        """Write every queued line, stop the writer thread, close the target. Idempotent."""
        writer, self._writer = self._writer, None
        if writer is not None:
            self._closing = True
            self._wake.set()
            # A stream stalled for CLOSE_TIMEOUT_SECONDS must not hang the exit.
            writer.join(CLOSE_TIMEOUT_SECONDS)
            self.target.close()
        super().close()


_TRACEBACKS = logging.Formatter()


def log_line(logger: logging.Logger, level: int, message: str, fields: dict[str, Any]) -> None:
    """`logger.log(level, message, extra={"fields": fields})`, for lines on the hot path.

    When the line would reach only a `BackgroundLogHandler` (the configured case), it is
    queued without making a `LogRecord`: building one, and the logging machinery around
    it, were about a third of the per-callback line's instructions (`bench.handlercost`).
    """
    if not logger.isEnabledFor(level):
        return
    handler = _only_background_handler(logger, level)
    if handler is None:
        logger.handle(
            logger.makeRecord(logger.name, level, "", 0, message, (), None, extra={FIELDS: fields})
        )
        return
    handler.queue_line(Line(time.time(), level, logger.name, message, fields))


def _only_background_handler(logger: logging.Logger, level: int) -> BackgroundLogHandler | None:
    """The handler a record of `logger` would reach, when that is one `BackgroundLogHandler`
    and no filter stands on the way; else None."""
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or node.disabled:
            return None
        if node.handlers:
            (handler, *others) = node.handlers
            if others or handler.filters or level < handler.level:
                return None
            return handler if isinstance(handler, BackgroundLogHandler) else None
        if not node.propagate:
            return None
        node = node.parent
    return None


def count_dropped_lines(on_drop: Callable[[], None] | None) -> None:
    """Count the lines the root logger's background handler drops with `on_drop`
    (for example a metric's `inc`); `None` stops counting. No-op without one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundLogHandler):
            handler.count_drops(on_drop)


def configure_logging(
    level: LogLevel,
    log_format: LogFormat,
    *,
    queue_lines: int = DEFAULT_QUEUE_LINES,
    interval: float = WRITE_INTERVAL_SECONDS,
) -> BackgroundLogHandler:
    """Send every log line to stderr in the chosen format, from a background thread
    (in batches, every `interval` seconds)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler = BackgroundLogHandler(stream, capacity=queue_lines, interval=interval)
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, BackgroundLogHandler):
            previous.close()  # configured twice (tests, `dev`): no second writer left running
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every failed reconnect at ERROR; ours say what it means.
    client_log = logging.getLogger(AIOKAFKA_CLIENT_LOGGER)
    client_log.setLevel(max(logging.getLevelName(level), logging.WARNING))
    collapse_repeated_lines(client_log)
    return handler
