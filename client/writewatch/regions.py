"""Wire codec of page regions (``writewatch.v1.PackedRegions``), vectorised with numpy.

A region list is an ``(n, 2)`` uint64 array of ``[start, end)`` byte addresses, page aligned,
sorted and non-overlapping (adjacent regions are allowed: scan results split on categories).
On the wire each region is a ``(gap_pages, n_pages)`` pair, the gap counted from the end of
the previous region (the first from ``base_address``): little-endian u32 pairs, or u64 pairs
when a value does not fit in 32 bits.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from ._proto.writewatch.v1.writewatch_pb2 import PackedRegions

__all__ = [
    "DEFAULT_PAGE_SIZE_BYTES",
    "MAX_FRAGMENT_BYTES",
    "PackedRegions",
    "Regions",
    "count_pages",
    "decode_regions",
    "empty_regions",
    "encode_regions",
    "split_regions",
]

Regions = npt.NDArray[np.uint64]
"""``(n, 2)`` uint64 array of ``[start, end)`` byte addresses."""

DEFAULT_PAGE_SIZE_BYTES = 4096
MAX_FRAGMENT_BYTES = 1 << 20
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_LITTLE_ENDIAN = sys.byteorder == "little"
_U32_LE = np.dtype("<u4")
_UINT64 = np.dtype(np.uint64)
_NARROW_PAIR_BYTES = 8
_WIDE_PAIR_BYTES = 16


def empty_regions() -> Regions:
    """An empty ``(0, 2)`` region array."""
    return np.empty((0, 2), dtype=np.uint64)


def _as_regions(regions: npt.ArrayLike) -> Regions:
    if isinstance(regions, np.ndarray) and regions.dtype == _UINT64 and regions.ndim == 2 and regions.shape[1] == 2:
        return regions  # the daemon's own arrays: skip asarray's conversions
    array = np.asarray(regions, dtype=np.uint64)
    if array.size == 0:
        return empty_regions()
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"regions must have shape (n, 2), not {array.shape}")
    return array


def _steps(
    flat: npt.NDArray[np.uint64], first: int, last: int, base_address: int, page_size_bytes: int
) -> npt.NDArray[np.uint64]:
    """The byte steps of ``[base, s0, e0, s1, e1, ...]`` (``flat`` is ``s0, e0, ...``: the
    interleaved gaps and lengths), validated."""
    # Sorted, non-overlapping regions make that sequence non-decreasing, and its steps are
    # exactly the interleaved (gap, n) pairs in bytes. Few, plain ufunc calls on purpose: the
    # daemon encodes right after a page-table walk, when every call runs with cold caches.
    steps = np.empty(len(flat), dtype=np.uint64)
    np.subtract(flat[1:], flat[:-1], out=steps[1:])
    steps[0] = (first - base_address) & _U64_MAX
    span_bytes = last - base_address
    if page_size_bytes & (page_size_bytes - 1) == 0:
        # Every bound is aligned when the first one and every later step are.
        misaligned = (first | int(np.bitwise_or.reduce(steps))) & (page_size_bytes - 1)
    else:
        misaligned = int(np.maximum.reduce(np.remainder(flat, page_size_bytes)))
    # In a non-decreasing sequence no step exceeds the whole span; a decreasing one wraps
    # around to more than that.
    if (
        misaligned
        or span_bytes < 0
        or int(np.maximum.reduce(steps)) > span_bytes
        or int(np.minimum.reduce(steps[1::2])) == 0
    ):
        _raise_invalid(flat.tolist(), base_address, page_size_bytes)
    return steps


def _raise_invalid(bounds: list[int], base_address: int, page_size_bytes: int) -> NoReturn:
    """Say precisely what is wrong with the region bounds the fast check refused (off the hot path)."""
    if any(bound % page_size_bytes for bound in bounds):
        raise ValueError(f"region bounds must be multiples of the page size {page_size_bytes}")
    if any(bounds[i] >= bounds[i + 1] for i in range(0, len(bounds), 2)):
        raise ValueError("every region must have start < end")
    if any(bounds[i] < bounds[i - 1] for i in range(1, len(bounds))):
        raise ValueError("regions must be sorted and non-overlapping")
    raise ValueError(f"base_address 0x{base_address:x} is above the first region 0x{bounds[0]:x}")


def encode_regions(
    regions: npt.ArrayLike,
    *,
    base_address: int | None = None,
    page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES,
    out: PackedRegions | None = None,
) -> PackedRegions:
    """Pack sorted, non-overlapping ``[start, end)`` regions; base_address defaults to the first start.

    ``out``, when given, is overwritten and returned: a message nested in another one is then
    filled in place, without the copy that assigning a built message costs.
    """
    array = _as_regions(regions)
    packed = PackedRegions() if out is None else out
    packed.page_size_bytes = _wire_page_size(page_size_bytes)
    if len(array) == 0:
        packed.base_address = base_address or 0
        packed.pairs = packed.wide_pairs = b""
        return packed
    flat = array.reshape(-1)
    first, last = int(flat[0]), int(flat[-1])
    base = first if base_address is None else base_address
    packed.base_address = base
    steps = _steps(flat, first, last, base, page_size_bytes)
    # No step exceeds the span, so a span under 2**32 pages settles u32 without a pass.
    span_pages = (last - base) // page_size_bytes
    shift = page_size_bytes.bit_length() - 1
    if page_size_bytes == 1 << shift:
        np.right_shift(steps, shift, out=steps)
    else:
        np.floor_divide(steps, page_size_bytes, out=steps)
    if span_pages <= _U32_MAX or int(np.maximum.reduce(steps)) <= _U32_MAX:
        # On a little-endian host the low halves of the u64 steps are the u32 pairs.
        packed.pairs = steps.view(_U32_LE)[0::2].tobytes() if _LITTLE_ENDIAN else steps.astype(_U32_LE).tobytes()
        packed.wide_pairs = b""
    else:
        packed.pairs = b""
        packed.wide_pairs = steps.astype("<u8").tobytes()
    return packed


def _narrow(regions: Regions, page_size_bytes: int) -> bool:
    """Whether u32 pairs surely suffice (relative to the first start): no gap or length can
    exceed the whole span, so a span under 2**32 pages settles it without a pass."""
    return (int(regions[-1, 1]) - int(regions[0, 0])) // page_size_bytes <= _U32_MAX


def _wire_page_size(page_size_bytes: int) -> int:
    # 0 on the wire means the common 4 KiB page, saving the field in nearly every message.
    return 0 if page_size_bytes == DEFAULT_PAGE_SIZE_BYTES else page_size_bytes


def decode_regions(packed: PackedRegions) -> Regions:
    """Unpack to an ``(n, 2)`` uint64 array of ``[start, end)`` byte addresses."""
    if packed.pairs and packed.wide_pairs:
        raise ValueError("PackedRegions sets both pairs and wide_pairs")
    raw, dtype, pair_bytes = (
        (packed.wide_pairs, "<u8", _WIDE_PAIR_BYTES) if packed.wide_pairs else (packed.pairs, "<u4", _NARROW_PAIR_BYTES)
    )
    if len(raw) % pair_bytes:
        raise ValueError(f"packed pairs of {len(raw)} bytes are not a multiple of {pair_bytes}")
    if not raw:
        return empty_regions()
    page = np.uint64(packed.page_size_bytes or DEFAULT_PAGE_SIZE_BYTES)
    # The running sum of the interleaved (gap, n) pairs is [s0, e0, s1, e1, ...] in pages.
    bounds = np.frombuffer(raw, dtype=dtype).astype(np.uint64)
    np.cumsum(bounds, out=bounds)
    bounds *= page
    bounds += np.uint64(packed.base_address)
    return bounds.reshape(-1, 2)


def count_pages(regions: npt.ArrayLike, page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES) -> int:
    """Total number of pages covered by the regions."""
    array = _as_regions(regions)
    return int(np.sum(array[:, 1] - array[:, 0], dtype=np.uint64)) // page_size_bytes


def split_regions(
    regions: npt.ArrayLike,
    max_bytes: int = MAX_FRAGMENT_BYTES,
    *,
    page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES,
) -> list[Regions]:
    """Split regions into consecutive chunks whose packed pairs take at most max_bytes each.

    Each chunk is meant to be encoded on its own (its own base address). Always returns at
    least one chunk, so an empty delta is still one fragment.
    """
    if max_bytes < _WIDE_PAIR_BYTES:
        raise ValueError(f"max_bytes must be at least {_WIDE_PAIR_BYTES}")
    array = _as_regions(regions)
    if len(array) * _WIDE_PAIR_BYTES <= max_bytes:
        # One chunk even at the widest encoding: no need to compute the pairs here (each
        # chunk is validated when it is encoded).
        return [array]
    # Inside a chunk the first gap becomes 0, so a chunk is narrow whenever the whole is;
    # deciding once keeps the split a single vectorised step.
    pair_bytes = _NARROW_PAIR_BYTES if _narrow(array, page_size_bytes) else _WIDE_PAIR_BYTES
    per_chunk = max_bytes // pair_bytes
    if len(array) <= per_chunk:
        return [array]
    return np.split(array, range(per_chunk, len(array), per_chunk))
