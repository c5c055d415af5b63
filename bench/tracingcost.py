"""What the tracing code path costs per callback when tracing is off (the default).

With export off and no trusted proxies, a callback still passes through the tracing
hooks: `Tracing.request` around the pipeline, two `Tracing.span` (validate, kafka
produce) and `Tracing.record_headers`. This times exactly those calls on the default
`Tracing` (as `BridgeServer` builds it with no `OTEL_*` variables) against the same
loop without them, and prints the difference per callback as one JSON line. The
benchmark divides it by the bridge's CPU per callback and sets it beside the bridge's
run-to-run spread (issue 15: tracing off must cost nothing measurable).
Run: python -m bench.tracingcost
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from multidict import CIMultiDict

from bridge.ops.tracing import build_tracing
from bridge.settings import OtelSettings

HEADERS = CIMultiDict({"Content-Type": "application/json", "Host": "127.0.0.1"})


def per_call_us(body: Callable[[], object], calls: int) -> float:
    """Best of 5 rounds of `calls` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            body()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    tracing = build_tracing(OtelSettings())  # no OTEL_* variables: export off
    assert not tracing.exporting, "unset OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER"
    records: list[object] = []

    def with_tracing() -> object:
        with tracing.request(HEADERS, "127.0.0.1"):
            with tracing.span("validate"):
                pass
            headers = [("content-type", b"application/json")]
            headers += tracing.record_headers()
            with tracing.span("kafka produce", records=2):
                records.append(headers)
        records.clear()
        return None

    def without() -> object:
        headers = [("content-type", b"application/json")]
        records.append(headers)
        records.clear()
        return None

    traced = per_call_us(with_tracing, args.calls)
    bare = per_call_us(without, args.calls)
    print(
        json.dumps(
            {
                "with_tracing_off_us": round(traced, 3),
                "without_us": round(bare, 3),
                "cost_us_per_callback": round(traced - bare, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
