"""Integer helpers for static shapes: ceiling division and rounding up to a multiple (capacities,
page and block counts, padded prompt lengths)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= a."""
    return cdiv(a, multiple) * multiple
