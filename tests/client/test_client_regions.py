"""Region codec: round trips, the wide-pair fallback, fragmentation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from writewatch.regions import (
    PackedRegions,
    count_pages,
    decode_regions,
    encode_regions,
    split_regions,
)

PAGE = 4096


def build(base_page: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Regions from (gap_pages, n_pages) pairs, computed independently of the codec."""
    rows = []
    end = base_page
    for gap, n_pages in pairs:
        start = end + gap
        end = start + n_pages
        rows.append((start * PAGE, end * PAGE))
    return np.array(rows, dtype=np.uint64).reshape(-1, 2)


small = st.integers(min_value=0, max_value=1000)
big = st.integers(min_value=0, max_value=1 << 40)
pair_lists = st.lists(
    st.tuples(st.one_of(small, big), st.integers(min_value=1, max_value=1 << 20)),
    max_size=60,
)


@given(base_page=st.integers(min_value=0, max_value=1 << 36), pairs=pair_lists)
def test_round_trip(base_page: int, pairs: list[tuple[int, int]]) -> None:
    regions = build(base_page, pairs)
    packed = encode_regions(regions)
    decoded = decode_regions(PackedRegions.FromString(packed.SerializeToString()))
    assert decoded.dtype == np.uint64
    assert decoded.shape == regions.shape
    assert np.array_equal(decoded, regions)


@given(pairs=st.lists(st.tuples(small, st.integers(min_value=1, max_value=1000)), min_size=1, max_size=60))
def test_small_values_use_narrow_pairs(pairs: list[tuple[int, int]]) -> None:
    packed = encode_regions(build(12345, pairs))
    assert packed.wide_pairs == b""
    assert len(packed.pairs) == 8 * len(pairs)


def test_falls_back_to_wide_pairs_when_a_gap_exceeds_u32() -> None:
    regions = build(0x1000, [(0, 1), (1 << 33, 2)])
    packed = encode_regions(regions)
    assert packed.pairs == b""
    assert len(packed.wide_pairs) == 32
    assert np.array_equal(decode_regions(packed), regions)


def test_explicit_base_address_and_exact_bytes() -> None:
    regions = np.array([[0x3000, 0x5000], [0x5000, 0x6000], [0x9000, 0xA000]], dtype=np.uint64)
    packed = encode_regions(regions, base_address=0x1000)
    assert packed.base_address == 0x1000
    assert np.frombuffer(packed.pairs, "<u4").tolist() == [2, 2, 0, 1, 3, 1]
    assert np.array_equal(decode_regions(packed), regions)


def test_empty() -> None:
    packed = encode_regions(np.empty((0, 2), dtype=np.uint64))
    assert packed.pairs == b"" and packed.wide_pairs == b""
    decoded = decode_regions(packed)
    assert decoded.shape == (0, 2)
    assert decode_regions(PackedRegions()).shape == (0, 2)


def test_other_page_size() -> None:
    regions = np.array([[0x10000, 0x30000]], dtype=np.uint64)
    packed = encode_regions(regions, page_size_bytes=0x10000)
    assert packed.page_size_bytes == 0x10000
    assert np.frombuffer(packed.pairs, "<u4").tolist() == [0, 2]
    assert np.array_equal(decode_regions(packed), regions)


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([[0x1000, 0x1800]], "multiples of the page size"),
        ([[0x2000, 0x2000]], "start < end"),
        ([[0x1000, 0x3000], [0x2000, 0x4000]], "sorted and non-overlapping"),
        ([[1, 2, 3]], "shape"),
    ],
)
def test_rejects_invalid_regions(regions: list[list[int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_regions(regions)


def test_rejects_malformed_wire_data() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_regions(PackedRegions(pairs=b"\x00" * 12))
    with pytest.raises(ValueError, match="both"):
        decode_regions(PackedRegions(pairs=b"\x00" * 8, wide_pairs=b"\x00" * 16))


@given(pairs=pair_lists, max_bytes=st.integers(min_value=16, max_value=200))
def test_split_chunks_fit_and_concatenate_back(pairs: list[tuple[int, int]], max_bytes: int) -> None:
    regions = build(7, pairs)
    chunks = split_regions(regions, max_bytes)
    assert len(chunks) >= 1
    assert np.array_equal(np.concatenate(chunks), regions)
    for chunk in chunks:
        packed = encode_regions(chunk)
        assert len(packed.pairs) + len(packed.wide_pairs) <= max_bytes
        assert np.array_equal(decode_regions(packed), chunk)


def test_split_default_is_about_one_mebibyte_per_fragment() -> None:
    n = 300_000
    starts = np.arange(n, dtype=np.uint64) * np.uint64(2 * PAGE)
    regions = np.column_stack((starts, starts + np.uint64(PAGE)))
    chunks = split_regions(regions)
    assert [len(c) for c in chunks] == [131072, 131072, n - 262144]
    assert count_pages(regions) == n


def reference_pairs(regions: np.ndarray, base: int, page: int) -> tuple[bytes, bytes] | None:
    """(pairs, wide_pairs) by the wire format's definition, one region at a time; None if invalid."""
    values: list[int] = []
    previous = base
    for start, end in regions.tolist():
        if start % page or end % page or start >= end or start < previous:
            return None
        values += [(start - previous) // page, (end - start) // page]
        previous = end
    if max(values, default=0) <= 0xFFFF_FFFF:
        return np.array(values, dtype="<u4").tobytes(), b""
    return b"", np.array(values, dtype="<u8").tobytes()


bounds = st.integers(min_value=0, max_value=1 << 20).map(lambda page: page * PAGE) | st.integers(0, 1 << 22)


@given(
    rows=st.lists(st.tuples(bounds, bounds), min_size=1, max_size=12),
    base_page=st.none() | st.integers(min_value=0, max_value=1 << 20),
    page=st.sampled_from([PAGE, 0x10000, 3 * PAGE]),
)
def test_encoding_matches_the_definition_and_refuses_what_it_must(
    rows: list[tuple[int, int]], base_page: int | None, page: int
) -> None:
    regions = np.array(rows, dtype=np.uint64)
    base = int(regions[0, 0]) if base_page is None else base_page * page
    expected = reference_pairs(regions, base, page)
    if expected is None:
        with pytest.raises(ValueError):
            encode_regions(regions, base_address=base, page_size_bytes=page)
        return
    packed = encode_regions(regions, base_address=base, page_size_bytes=page)
    assert (packed.pairs, packed.wide_pairs) == expected
    assert packed.base_address == base


@given(base_page=st.integers(min_value=0, max_value=1 << 36), pairs=pair_lists)
def test_sorted_regions_encode_as_defined(base_page: int, pairs: list[tuple[int, int]]) -> None:
    regions = build(base_page, pairs)
    if len(regions) == 0:
        return
    expected = reference_pairs(regions, int(regions[0, 0]), PAGE)
    packed = encode_regions(regions)
    assert (packed.pairs, packed.wide_pairs) == expected


def test_encodes_into_a_given_message() -> None:
    from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb

    regions = build(9, [(0, 2), (5, 1)])
    delta = pb.Delta(regions=PackedRegions(wide_pairs=b"\x01" * 16, base_address=1))
    returned = encode_regions(regions, out=delta.regions)
    assert returned is delta.regions
    assert delta.regions == encode_regions(regions)
    assert np.array_equal(decode_regions(delta.regions), regions)
