"""The log writer: a log call never waits for stderr, drops are counted, closing flushes."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from bridge.ops.logs import (
    AIOKAFKA_CLIENT_LOGGER,
    FIELDS,
    MAX_KINDS,
    BackgroundLogHandler,
    JsonFormatter,
    RepeatedLines,
    configure_logging,
    count_dropped_lines,
    log_line,
)
from bridge.ops.metrics import Metrics
from bridge.settings import LogFormat


class StalledStream(io.StringIO):
    """A stream whose writes block until `release` is set, like a full stderr pipe."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        self.release.wait(30)
        return super().write(text)


def json_handler(stream: io.StringIO) -> logging.StreamHandler[io.StringIO]:
    target = logging.StreamHandler(stream)
    target.setFormatter(JsonFormatter())
    return target


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("bridge.test", logging.INFO, __file__, 1, message, args, None)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def stalled() -> Iterator[StalledStream]:
    stream = StalledStream()
    yield stream
    stream.release.set()  # whatever the test did, the writer thread can finish


def test_a_stalled_stream_does_not_block_a_log_call(stalled: StalledStream) -> None:
    handler = BackgroundLogHandler(json_handler(stalled), capacity=10)
    try:
        handler.handle(record("first"))
        assert stalled.writing.wait(10), "the writer thread never took the first line"
        started = time.monotonic()
        for number in range(500):
            handler.handle(record("line %d", number))
        # Synchronous logging would wait here for 30 s (the stalled write): it returns at once.
        assert time.monotonic() - started < 5
        # The writer holds "first"; the queue holds 10; the other 490 lines are dropped.
        assert handler.dropped == 490
    finally:
        stalled.release.set()
        handler.close()
    written = [line["message"] for line in lines(stalled)]
    assert written == ["first", *(f"line {n}" for n in range(10))]


def test_dropped_lines_are_counted_in_the_metric(stalled: StalledStream) -> None:
    metrics = Metrics(CollectorRegistry())
    handler = BackgroundLogHandler(json_handler(stalled), capacity=1)
    try:
        handler.handle(record("first"))
        assert stalled.writing.wait(10)
        handler.handle(record("queued"))
        handler.handle(record("dropped before the metric was attached"))
        handler.count_drops(metrics.log_lines_dropped.inc)
        for _ in range(4):
            handler.handle(record("dropped"))
    finally:
        stalled.release.set()
        handler.close()
    assert handler.dropped == 5
    assert metrics.registry.get_sample_value("luma_bridge_log_lines_dropped_total") == 5


def test_closing_writes_every_queued_line() -> None:
    class SlowStream(io.StringIO):
        def write(self, text: str) -> int:
            time.sleep(0.0005)  # slower than the caller: the queue fills up behind it
            return super().write(text)

    stream = SlowStream()
    handler = BackgroundLogHandler(json_handler(stream), capacity=5000)
    for number in range(2000):
        handler.handle(record("line %d", number))
    handler.close()
    assert handler.dropped == 0
    assert [line["message"] for line in lines(stream)] == [f"line {n}" for n in range(2000)]
    handler.close()  # twice is safe


def test_logging_shutdown_flushes_the_configured_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        handler = configure_logging("INFO", "json")
        registry_metrics = Metrics(CollectorRegistry())
        count_dropped_lines(registry_metrics.log_lines_dropped.inc)
        for number in range(300):
            logging.getLogger("bridge.test").info("callback", extra={"fields": {"number": number}})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("bridge.test").exception("failed")
        handler.flush()
        handler.close()  # what logging.shutdown() does at exit
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    written = lines(stream)
    assert [line.get("number") for line in written[:300]] == list(range(300))
    assert written[-1]["message"] == "failed"
    assert "ValueError: boom" in str(written[-1]["exception"])
    assert registry_metrics.registry.get_sample_value("luma_bridge_log_lines_dropped_total") == 0


def test_configuring_again_stops_the_previous_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        first = configure_logging("INFO", "text")
        second = configure_logging("INFO", "text")
        assert root.handlers == [second]
        assert first._writer is None  # its thread was stopped
        second.close()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_a_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BackgroundLogHandler(logging.StreamHandler(io.StringIO()), capacity=0)


def test_lines_a_broken_stream_refuses_count_as_dropped() -> None:
    class BrokenStream(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError("the reader went away")

    handler = BackgroundLogHandler(json_handler(BrokenStream()), capacity=100)
    for number in range(3):
        handler.handle(record("line %d", number))
    handler.flush()
    assert handler.dropped == 3
    handler.close()


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """A StringIO for stderr, for the root logger the test configures (then restored)."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        yield stream
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


FIELDS_OF_A_LINE = {"outcome": "accepted", "status": 200, "records": ["t/0@1"], "ip": object()}


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_line_prints_what_logger_log_with_fields_prints(
    configured: io.StringIO, log_format: LogFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = configured
    monkeypatch.setattr("sys.stderr", stream)
    handler = configure_logging("INFO", log_format)
    logger = logging.getLogger("bridge.test.line")
    log_line(logger, logging.INFO, "callback", FIELDS_OF_A_LINE)
    logger.info("callback", extra={FIELDS: FIELDS_OF_A_LINE})
    log_line(logger, logging.DEBUG, "below the level", {"n": 1})
    handler.flush()
    fast, usual = stream.getvalue().splitlines()
    if log_format == "json":
        fast_entry, usual_entry = json.loads(fast), json.loads(usual)
        assert fast_entry.pop("time")[:16] == usual_entry.pop("time")[:16]
        assert fast_entry == usual_entry
        assert fast_entry["level"] == "INFO"
        assert fast_entry["logger"] == "bridge.test.line"
        assert fast_entry["records"] == ["t/0@1"]
    else:
        assert fast.split(" ", 2)[2] == usual.split(" ", 2)[2]  # after the date and time
        assert "INFO    bridge.test.line callback outcome=accepted status=200" in fast


def test_log_line_goes_through_filters_and_other_handlers_as_a_record(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = configured
    monkeypatch.setattr("sys.stderr", stream)
    handler = configure_logging("INFO", "json")
    logger = logging.getLogger("bridge.test.filtered")
    seen: list[logging.LogRecord] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    logger.addFilter(keep)
    try:
        log_line(logger, logging.INFO, "callback", {"n": 1})
    finally:
        logger.filters.clear()
    extra = Seen()
    logging.getLogger().addHandler(extra)
    try:
        log_line(logger, logging.INFO, "callback", {"n": 2})
    finally:
        logging.getLogger().removeHandler(extra)
    handler.flush()
    assert [getattr(record, FIELDS)["n"] for record in seen] == [1, 2]
    assert [line["n"] for line in lines(stream)] == [1, 2]


def test_log_line_is_dropped_and_counted_when_the_queue_is_full(stalled: StalledStream) -> None:
    handler = BackgroundLogHandler(json_handler(stalled), capacity=1)
    logger = logging.getLogger("bridge.test.full")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        log_line(logger, logging.INFO, "first", {})
        assert stalled.writing.wait(10)
        log_line(logger, logging.INFO, "queued", {})
        log_line(logger, logging.INFO, "dropped", {})
        assert handler.dropped == 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        stalled.release.set()
        handler.close()
    assert [line["message"] for line in lines(stalled)] == ["first", "queued"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def client_record(message: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", level, __file__, 1, message, args, None)


def test_a_repeated_line_is_let_through_once_per_window_and_says_how_many_were_held() -> None:
    clock = Clock()
    repeats = RepeatedLines(window=10.0, clock=clock)
    unable = "Unable connect to node with id %s: %s"
    assert repeats.filter(client_record(unable, 3, "refused"))
    held = [repeats.filter(client_record(unable, node, "refused")) for node in (3, 2, 3)]
    assert held == [False, False, False]  # other arguments, same kind
    clock.now += 9.9
    assert not repeats.filter(client_record(unable, 3, "refused"))
    clock.now += 0.1
    after = client_record(unable, 1, "refused")
    assert repeats.filter(after)
    assert after.getMessage() == (
        "Unable connect to node with id 1: refused (4 more like this since the last one shown)"
    )
    clock.now += 10.0
    quiet = client_record(unable, 1, "refused")
    assert repeats.filter(quiet)
    assert quiet.getMessage() == "Unable connect to node with id 1: refused"  # none held back


def test_lines_of_another_template_or_level_are_not_held_back() -> None:
    repeats = RepeatedLines(window=10.0, clock=Clock())
    assert repeats.filter(client_record("Unable to update metadata from %s", [3]))
    assert repeats.filter(client_record("Unable connect to node with id %s: %s", 3, "x"))
    assert repeats.filter(
        client_record("Unable to update metadata from %s", [3], level=logging.WARNING)
    )
    assert not repeats.filter(client_record("Unable to update metadata from %s", [2]))


def test_the_kinds_kept_track_of_are_bounded() -> None:
    clock = Clock()
    repeats = RepeatedLines(window=10.0, clock=clock)
    for number in range(MAX_KINDS + 5):  # a message formatted before logging: a kind each
        assert repeats.filter(client_record(f"Unable connect to node {number}"))
    assert len(repeats._runs) <= MAX_KINDS
    assert not repeats.filter(client_record(f"Unable connect to node {MAX_KINDS + 4}"))


def test_configuring_holds_back_aiokafka_client_repeats_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    root, client = logging.getLogger(), logging.getLogger(AIOKAFKA_CLIENT_LOGGER)
    saved = root.handlers[:], root.level, client.filters[:], client.level
    try:
        configure_logging("INFO", "json").close()
        handler = configure_logging("INFO", "json")
        assert [type(f) for f in client.filters] == [RepeatedLines]  # not one per call
        handler.close()
    finally:
        root.handlers[:], root.level, client.filters[:], client.level = saved
