"""Deterministic unit hashing, bit-compatible with GrowthBook's hash versions 1 and 2."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Final

# FNV-1a 32-bit parameters (Fowler, Noll and Vo; IETF draft-eastlake-fnv, section 2.1 and
# table of FNV_Prime / offset_basis for 32 bits). The loops below spell them as literals,
# 0x811C9DC5 and 0x01000193, because they run on every decision and a literal is cheaper
# than a global lookup.
FNV1A32_OFFSET_BASIS: Final = 0x811C9DC5
FNV1A32_PRIME: Final = 0x01000193
_UINT32_MASK: Final = 0xFFFFFFFF

# GrowthBook maps the 32-bit hash to a bucket on a fixed decimal grid: version 1 keeps
# three decimals (n % 1000 / 1000), version 2 keeps four (n % 10000 / 10000).
HASH_VERSIONS: Final = (1, 2)
BUCKET_GRID: Final = {1: 1000, 2: 10000}

# UTF-16 in the machine's byte order, so a memoryview cast to unsigned 16-bit integers
# reads code units directly, without a byte-pair loop in Python.
_NATIVE_UTF16: Final = "utf-16-le" if sys.byteorder == "little" else "utf-16-be"

# Code units below 128 change only the low 7 bits of the state when XORed in.
_ASCII_STATES: Final = 128


def fnv1a32_update(hval: int, text: str) -> int:
    """Continue an FNV-1a 32 hash over the UTF-16 code units of ``text``.

    GrowthBook's JavaScript SDK feeds ``charCodeAt(i)`` (one UTF-16 code unit, not one
    byte and not one code point) into FNV-1a, so a character outside the Basic
    Multilingual Plane counts as its two surrogates. Hashing code units here keeps
    non-ASCII and emoji ids on the same arm as in the JavaScript SDK. Lone surrogates,
    which Python strings and JavaScript strings can both hold, pass through unchanged.
    """
    if text.isascii():
        # For ASCII, each byte equals its UTF-16 code unit; iterating bytes is the
        # fastest loop CPython offers.
        for code_unit in text.encode("ascii"):
            hval = ((hval ^ code_unit) * 0x01000193) & 0xFFFFFFFF
        return hval
    for code_unit in memoryview(text.encode(_NATIVE_UTF16, "surrogatepass")).cast("H"):
        hval = ((hval ^ code_unit) * 0x01000193) & 0xFFFFFFFF
    return hval


def fnv1a32(text: str) -> int:
    """FNV-1a 32 of ``text``'s UTF-16 code units, as GrowthBook's JavaScript SDK computes it."""
    return fnv1a32_update(FNV1A32_OFFSET_BASIS, text)


@dataclass(frozen=True, slots=True)
class FixedSuffix:
    """FNV-1a 32 over a fixed ASCII suffix, precomputed for every starting state.

    Hash version 1 hashes ``unit_id + seed`` and namespaces hash ``unit_id + "__" + id``:
    the varying part comes first, so the suffix's state cannot simply be saved. It can be
    folded instead. XOR with a code unit below 128 only changes the state's low 7 bits,
    and the low 7 bits of a product modulo 2**32 depend only on the low 7 bits of its
    factors. By induction over the suffix's m code units, hashing the suffix from state h
    gives ``h * P**m + offsets[h % 128]`` modulo 2**32, with 128 offsets that depend only
    on the suffix. Each offset comes from running FNV-1a from the small state ``low``:
    ``offsets[low] = fnv1a32_update(low, suffix) - low * P**m``. A decision then pays
    one multiply and one add for the whole suffix. Suffixes with non-ASCII characters
    keep ``offsets`` empty and are hashed code unit by code unit.
    """

    text: str
    multiplier: int
    offsets: tuple[int, ...]


def fixed_suffix(text: str) -> FixedSuffix:
    """Precompute the FNV-1a 32 continuation over ``text`` (see ``FixedSuffix``)."""
    if not text.isascii():
        return FixedSuffix(text=text, multiplier=0, offsets=())
    multiplier = pow(FNV1A32_PRIME, len(text), 2**32)
    offsets = tuple(
        (fnv1a32_update(low, text) - low * multiplier) & _UINT32_MASK
        for low in range(_ASCII_STATES)
    )
    return FixedSuffix(text=text, multiplier=multiplier, offsets=offsets)


def fnv1a32_update_fixed(hval: int, suffix: FixedSuffix) -> int:
    """``fnv1a32_update(hval, suffix.text)``, in constant time for an ASCII suffix."""
    offsets = suffix.offsets
    if offsets:
        return (hval * suffix.multiplier + offsets[hval & 0x7F]) & 0xFFFFFFFF
    return fnv1a32_update(hval, suffix.text)


def bucket_index_v1(unit_id: str, seed: str | FixedSuffix) -> int:
    """Hash version 1 bucket index: FNV-1a 32 of ``unit_id + seed``, modulo 1000.

    GrowthBook also uses this hash, with seed ``"__" + namespace id``, to place units in
    namespaces. Pass the seed as a ``FixedSuffix`` when it is hashed many times.
    """
    if isinstance(seed, FixedSuffix):
        return fnv1a32_update_fixed(fnv1a32(unit_id), seed) % 1000
    return fnv1a32_update(fnv1a32(unit_id), seed) % 1000


def bucket_index_v2(seed_state: int, unit_id: str) -> int:
    """Hash version 2 bucket index of ``unit_id``, given ``seed_state = fnv1a32(seed)``.

    Version 2 hashes ``seed + unit_id`` and then the decimal string of that result again
    (GrowthBook SDK spec, ``hash``). The seed comes first, so its FNV state is computed
    once per experiment and each decision hashes only the unit id and about ten digits.
    """
    first = fnv1a32_update(seed_state, unit_id)
    second = 0x811C9DC5
    for digit in str(first).encode("ascii"):
        second = ((second ^ digit) * 0x01000193) & 0xFFFFFFFF
    return second % 10000


def bucket_index(*, seed: str, unit_id: str, version: int) -> int:
    """Position of ``unit_id`` on GrowthBook's bucket grid (0 ≤ index < ``BUCKET_GRID[version]``).

    Version 1 is ``bucket_index_v1`` and version 2 is ``bucket_index_v2`` (GrowthBook SDK
    spec, ``hash``). Raises ValueError for any other version.
    """
    if version == 2:
        return bucket_index_v2(fnv1a32(seed), unit_id)
    if version == 1:
        return bucket_index_v1(unit_id, seed)
    raise ValueError(f"version: unsupported hash version {version!r}, expected 1 or 2")


def bucket(*, seed: str, unit_id: str, version: int) -> float:
    """GrowthBook's ``hash(seed, value, version)``: the unit's bucket in [0, 1).

    GrowthBook returns null for an unknown version and the unit is then left out of the
    experiment; here an unknown version is a configuration error and raises ValueError.
    """
    return bucket_index(seed=seed, unit_id=unit_id, version=version) / BUCKET_GRID[version]
