"""Integer helpers for quantities with units: ceiling division and rounding to a multiple."""

from __future__ import annotations

__all__ = ["ceil_div", "round_down", "round_up"]


def ceil_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded up (e.g. bytes to the number of pages that hold them)."""
    return -(-numerator // denominator)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= value`` (e.g. an end address to a page)."""
    return ceil_div(value, multiple) * multiple


def round_down(value: int, multiple: int) -> int:
    """The largest multiple of ``multiple`` that is ``<= value``."""
    return value - value % multiple
