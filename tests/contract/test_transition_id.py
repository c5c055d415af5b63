"""`luma-transition-id`: BLAKE2b-128 of the compact, key-sorted JSON of generation id,
state and `assets`, so a callback and the reconciler's read of the same moment (whose
members may come in another order) carry one id, and a consumer can recompute it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from bridge.contract.callback import transition_id, transition_id_of


def recomputed(generation_id: str, state: str, assets: Any) -> str:
    encoded = json.dumps(
        [generation_id, state, assets], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.blake2b(encoded.encode(), digest_size=16).hexdigest()


ASSETS = {"video": "https://cdn.example/v.mp4", "image": "https://cdn.example/ï.jpg"}


def test_the_id_is_the_hash_of_the_sorted_compact_json_whatever_the_member_order() -> None:
    reordered = dict(reversed(list(ASSETS.items())))
    assert list(reordered) != list(ASSETS)
    expected = recomputed("g-1", "completed", ASSETS)
    assert transition_id("g-1", "completed", ASSETS) == expected
    assert transition_id_of("g-1", "completed", reordered) == expected
    assert transition_id_of("g-1", "dreaming", ASSETS) != expected
    assert transition_id_of("g-2", "completed", ASSETS) != expected
    assert transition_id_of("g-1", "completed", None) != expected


@pytest.mark.parametrize("number", [2**64, -(2**70)], ids=["beyond-64-bits", "negative"])
def test_assets_orjson_cannot_encode_get_the_same_spelling_of_the_id(number: int) -> None:
    assets = {"zeta": number, **ASSETS}
    reordered = dict(reversed(list(assets.items())))
    assert transition_id_of("g-1", "completed", assets) == recomputed("g-1", "completed", assets)
    assert transition_id_of("g-1", "completed", reordered) == recomputed("g-1", "completed", assets)


def test_assets_orjson_can_encode_are_hashed_as_orjson_spells_them() -> None:
    """The stdlib is only the fallback: where the two spell a value differently (`1e-7`,
    `1e-07`), the id is orjson's, the one every other record carries."""
    assets = {**ASSETS, "scale": 1e-7}
    assert transition_id_of("g-1", "completed", assets) == transition_id("g-1", "completed", assets)
    assert transition_id_of("g-1", "completed", assets) != recomputed("g-1", "completed", assets)
