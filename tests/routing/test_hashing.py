"""Tests for GrowthBook-compatible FNV-1a hashing (rampart_sdk.hashing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rampart_sdk.hashing import (
    BUCKET_GRID,
    bucket,
    bucket_index,
    bucket_index_v1,
    bucket_index_v2,
    fixed_suffix,
    fnv1a32,
    fnv1a32_update,
    fnv1a32_update_fixed,
)

# GrowthBook's SDK conformance vectors (packages/sdk-js/test/cases.json, specVersion 0.8.0).
CASES_PATH = Path(__file__).resolve().parents[2] / "../shared/reference/growthbook-cases.json"
CASES: dict[str, Any] = json.loads(CASES_PATH.read_text(encoding="utf-8"))

# Any string Python can hold, lone surrogates included: JavaScript strings can hold them
# too, and the JavaScript SDK hashes them as ordinary code units.
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)


def fnv1a32_by_hand(text: str) -> int:
    """An independent FNV-1a 32 over UTF-16 code units, spelled out for the tests.

    Code units come from the UTF-16 surrogate formula (Unicode 15.0, section 3.9, D91)
    rather than a codec, and the multiply is plain integer arithmetic modulo 2**32.
    """
    hval = 2166136261
    for character in text:
        code_point = ord(character)
        if code_point > 0xFFFF:
            offset = code_point - 0x10000
            code_units = [0xD800 + (offset >> 10), 0xDC00 + (offset & 0x3FF)]
        else:
            code_units = [code_point]
        for code_unit in code_units:
            hval = ((hval ^ code_unit) * 16777619) % 2**32
    return hval


@pytest.mark.parametrize(("seed", "value", "version", "expected"), CASES["hash"])
def test_growthbook_hash_vectors(
    seed: str, value: str, version: int, expected: float | None
) -> None:
    if expected is None:
        # GrowthBook returns null for an unknown version; Rampart treats it as a config error.
        with pytest.raises(ValueError, match="version"):
            bucket(seed=seed, unit_id=value, version=version)
    else:
        assert bucket(seed=seed, unit_id=value, version=version) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # FNV-1a 32 test vectors published with the reference implementation
        # (Landon Curt Noll, isthe.com/chongo/tech/comp/fnv, test_fnv.c).
        ("", 0x811C9DC5),
        ("a", 0xE40C292C),
        ("b", 0xE70C2DE5),
        ("foobar", 0xBF9CF968),
    ],
)
def test_fnv1a32_reference_vectors(text: str, expected: int) -> None:
    assert fnv1a32(text) == expected


# Ids outside the Basic Multilingual Plane, with the values GrowthBook's JavaScript SDK
# gives them. Computed with Node.js 18 running FNV-1a over `str.charCodeAt(i)` with
# `Math.imul(h, 0x01000193)`, then GrowthBook's hash formulas with seed "checkout-ranker":
# v2 = (fnv(fnv(seed + id) + "") % 10000) / 10000, v1 = (fnv(id + seed) % 1000) / 1000.
# fnv1a32_by_hand above reproduces the same numbers independently.
ASTRAL_IDS = [
    # (unit id, UTF-16 length, fnv1a32(id), v2 bucket, v1 bucket)
    ("\U0001f600", 2, 0xCB31C4B8, 0.1596, 0.234),
    ("user-\U0001f600-42", 10, 0xF7CD04C1, 0.6198, 0.705),
    ("\U0001f680\U0001f680", 4, 0xBF27AA8D, 0.0303, 0.933),
    ("\U0001d518ser", 5, 0x0A84AECA, 0.3584, 0.248),
    ("Jos\u00e9-\U0001f389", 7, 0xA646F5AE, 0.6865, 0.78),
    ("\U0001f1eb\U0001f1f7", 4, 0x09F9FCE9, 0.8073, 0.545),
]


@pytest.mark.parametrize(("unit_id", "utf16_length", "expected_fnv", "v2", "v1"), ASTRAL_IDS)
def test_astral_ids_hash_utf16_code_units_like_the_javascript_sdk(
    unit_id: str, utf16_length: int, expected_fnv: int, v2: float, v1: float
) -> None:
    assert len(unit_id.encode("utf-16-le")) // 2 == utf16_length
    assert fnv1a32(unit_id) == expected_fnv == fnv1a32_by_hand(unit_id)
    assert bucket(seed="checkout-ranker", unit_id=unit_id, version=2) == v2
    assert bucket(seed="checkout-ranker", unit_id=unit_id, version=1) == v1


def test_code_point_hashing_would_disagree_on_an_emoji() -> None:
    # Hashing code points (one ord() per character) instead of code units gives another
    # value, so the astral tests above really tell the two apart.
    by_code_point = 2166136261
    for character in "\U0001f600":
        by_code_point = ((by_code_point ^ ord(character)) * 16777619) % 2**32
    assert by_code_point != fnv1a32("\U0001f600")


def test_lone_surrogates_hash_as_code_units() -> None:
    # "\ud83d\ude00" held as two separate code points is the same code-unit sequence as
    # the emoji U+1F600, as it is in JavaScript.
    assert fnv1a32("\ud83d\ude00") == fnv1a32("\U0001f600")
    assert fnv1a32("\ud83d") == fnv1a32_by_hand("\ud83d")


@settings(max_examples=200)
@given(text=ANY_TEXT)
def test_fnv1a32_matches_independent_implementation(text: str) -> None:
    assert fnv1a32(text) == fnv1a32_by_hand(text)


@settings(max_examples=200)
@given(prefix=ANY_TEXT, suffix=ANY_TEXT)
def test_hash_state_continues_across_a_split(prefix: str, suffix: str) -> None:
    # assign() relies on this to hash a version 2 seed once per experiment.
    assert fnv1a32_update(fnv1a32(prefix), suffix) == fnv1a32(prefix + suffix)


@settings(max_examples=300)
@given(
    hval=st.integers(min_value=0, max_value=2**32 - 1),
    suffix=st.one_of(st.text(alphabet=st.characters(max_codepoint=127), max_size=40), ANY_TEXT),
)
def test_folded_suffix_equals_hashing_it_code_unit_by_code_unit(hval: int, suffix: str) -> None:
    # Version 1 and namespace hashes fold their constant seed into one multiply-add.
    assert fnv1a32_update_fixed(hval, fixed_suffix(suffix)) == fnv1a32_update(hval, suffix)


def test_folded_suffix_covers_every_low_state() -> None:
    # All 128 values of the low 7 bits, each with high bits set, for a typical seed.
    suffix = fixed_suffix("__checkout-namespace")
    assert len(suffix.offsets) == 128
    for low in range(128):
        hval = 0xDEADBE80 | low
        assert fnv1a32_update_fixed(hval, suffix) == fnv1a32_update(hval, suffix.text)


@settings(max_examples=200)
@given(seed=ANY_TEXT, unit_id=ANY_TEXT)
def test_fast_bucket_indexes_follow_growthbook_formulas(seed: str, unit_id: str) -> None:
    # GrowthBook SDK spec, hash(): v2 = fnv(str(fnv(seed + value))) % 10000,
    # v1 = fnv(value + seed) % 1000, written here with the independent implementation.
    expected_v2 = fnv1a32_by_hand(str(fnv1a32_by_hand(seed + unit_id))) % 10000
    expected_v1 = fnv1a32_by_hand(unit_id + seed) % 1000
    assert bucket_index_v2(fnv1a32(seed), unit_id) == expected_v2
    assert bucket_index(seed=seed, unit_id=unit_id, version=2) == expected_v2
    assert bucket_index_v1(unit_id, seed) == expected_v1
    assert bucket_index_v1(unit_id, fixed_suffix(seed)) == expected_v1
    assert bucket_index(seed=seed, unit_id=unit_id, version=1) == expected_v1


@given(seed=ANY_TEXT, unit_id=ANY_TEXT, version=st.sampled_from([1, 2]))
def test_bucket_lies_on_the_version_grid(seed: str, unit_id: str, version: int) -> None:
    value = bucket(seed=seed, unit_id=unit_id, version=version)
    assert 0.0 <= value < 1.0
    assert value == bucket_index(seed=seed, unit_id=unit_id, version=version) / BUCKET_GRID[version]


@pytest.mark.parametrize("version", [0, 3, 99])
def test_unknown_hash_version_raises(version: int) -> None:
    with pytest.raises(ValueError, match="version"):
        bucket_index(seed="s", unit_id="u", version=version)
