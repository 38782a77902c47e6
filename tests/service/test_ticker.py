"""The tick-interval rule, in its one home."""

from __future__ import annotations

import pytest

from writewatchd._exceptions import UsageError
from writewatchd.service.ticker import MAX_TICK_INTERVAL_MS, tick_interval_ms


def test_zero_asks_for_the_default() -> None:
    assert tick_interval_ms(0, default_ms=50, min_ms=5) == 50


def test_bounds_are_inclusive() -> None:
    assert tick_interval_ms(5, default_ms=50, min_ms=5) == 5
    assert tick_interval_ms(MAX_TICK_INTERVAL_MS, default_ms=50, min_ms=5) == MAX_TICK_INTERVAL_MS


@pytest.mark.parametrize("requested_ms", [4, MAX_TICK_INTERVAL_MS + 1])
def test_out_of_bounds_is_a_usage_error(requested_ms: int) -> None:
    with pytest.raises(UsageError, match="tick_interval_ms"):
        tick_interval_ms(requested_ms, default_ms=50, min_ms=5)
