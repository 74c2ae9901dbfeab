"""Integer helpers for static shapes and their traced counterparts: ceiling division and rounding up
to a multiple (capacities, page and block counts, padded prompt lengths, KIVI group counts)."""

from __future__ import annotations

from typing import TypeVar

IntLike = TypeVar("IntLike")  # a Python int, a NumPy integer, or an integer jax array (traced or not)


def cdiv(a: IntLike, b: int) -> IntLike:
    """ceil(a / b) for integers, b > 0; works elementwise on integer arrays."""
    return -(-a // b)


def round_up(a: IntLike, multiple: int) -> IntLike:
    """The smallest multiple of `multiple` that is >= a (elementwise on integer arrays)."""
    return cdiv(a, multiple) * multiple
