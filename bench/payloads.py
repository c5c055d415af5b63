"""The callback bodies every target receives: Luma-shaped, about 1 KB, one id placeholder.

Built from `bridge.devtools.simulate`'s generation lifecycle (queued, dreaming, completed) with
a prompt of typical length, so the sizes match what Luma sends for a real generation.
The generation id is a placeholder each load generator replaces per request.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

from bridge.devtools.simulate import generation_lifecycle

PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
PROMPT = (
    "A slow cinematic dolly shot through a rain-soaked neon market at night, steam rising "
    "from food stalls, reflections of pink and teal signs shimmering in the puddles, a "
    "woman in a yellow raincoat walks toward the camera holding a paper lantern, shallow "
    "depth of field, anamorphic lens flares, 35mm film grain, moody volumetric light, "
    "gentle handheld motion, hyper-detailed, photorealistic, 4k, color graded teal and "
    "orange, soft bokeh in the background, the camera slowly rises to reveal the skyline"
)


def templates(seed: int = 7) -> list[str]:
    """Three compact JSON bodies (queued, dreaming, completed), each with the placeholder id."""
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    created = datetime(2026, 5, 30, 12, 34, 56, tzinfo=UTC)
    while True:
        lifecycle = generation_lifecycle(rng, created)
        if lifecycle[0]["generation_type"] == "video" and lifecycle[-1]["state"] == "completed":
            break
    bodies = []
    for body in lifecycle:
        real_id = body["id"]
        body["request"]["prompt"] = PROMPT
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        # Only the top-level id varies; asset URLs keep the sample's id.
        bodies.append(text.replace(f'"id":"{real_id}"', f'"id":"{PLACEHOLDER}"', 1))
    return bodies


def write_templates(path: Path) -> Path:
    """One body per line, for wrk's Lua script and the other generators."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(templates()) + "\n", encoding="utf-8")
    return path


def load_templates(path: Path) -> list[tuple[bytes, bytes]]:
    """(prefix, suffix) around the placeholder, per template line."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if PLACEHOLDER in line:
            prefix, suffix = line.encode().split(PLACEHOLDER.encode(), 1)
            pairs.append((prefix, suffix))
    return pairs


def generation_id(worker: int, counter: int) -> bytes:
    """A UUID-shaped id unique per (worker, counter), as wrk's script makes them."""
    return b"%08x-%04x-4000-8000-%012x" % (worker, (counter >> 28) & 0xFFFF, counter)
