"""Tests for the primes.count kernels: known values, and compiled kernels against the reference."""

from collections.abc import Callable
from typing import cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nsqjobs_tasks.kernels import primes_py

from tests import kernel_impls

Kernel = Callable[[int, int], int]

MAX_STOP = 10**12
COMPILED = kernel_impls.COMPILED
# Primes in [10**12 - 100, 10**12), checked independently by trial division below.
PRIMES_BELOW_1E12_WINDOW = 4
# One segment holds SEGMENT_CELLS odd numbers; wider windows exercise the carry between segments.
MULTI_SEGMENT_WIDTH = 5 * primes_py.SEGMENT_CELLS


def _starts(high: int) -> st.SearchStrategy[int]:
    """Starts in [0, high], weighted to the top: plain st.integers mostly draws small values."""
    return st.one_of(
        st.integers(0, high), st.integers(high // 1000, high), st.integers(high - 10**6, high)
    )


def _is_prime_by_trial_division(n: int) -> bool:
    """Return whether n is prime, by trial division: slow, but shares nothing with the sieve."""
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    d = 5
    while d * d <= n:
        if n % d == 0 or n % (d + 2) == 0:
            return False
        d += 6
    return True


@pytest.fixture(params=["python", *COMPILED])
def count_primes(request: pytest.FixtureRequest) -> Kernel:
    """Each kernel in turn; a compiled one that cannot be imported skips (fails under CI)."""
    name = cast(str, request.param)
    if name == "python":
        return primes_py.count_primes
    return cast(Kernel, kernel_impls.param("primes", "count_primes", name))


@pytest.mark.parametrize(
    ("start", "stop", "expected"),
    [
        (0, 10, 4),
        (0, 100, 25),
        (0, 1000, 168),
        (0, 10**6, 78498),
        (0, 10**7, 664579),
        (0, 0, 0),
        (0, 2, 0),
        (2, 3, 1),
        (0, 3, 1),
        (3, 4, 1),
        (4, 5, 0),
        (1, 2, 0),
        (7, 7, 0),
        (10, 5, 0),
        (999983, 999984, 1),  # largest prime below 10**6: a base prime that must not cross itself
        (MAX_STOP - 100, MAX_STOP, PRIMES_BELOW_1E12_WINDOW),
        (MAX_STOP - 11, MAX_STOP - 10, 1),  # 999999999989, the largest prime below 10**12
        (MAX_STOP, MAX_STOP, 0),
    ],
)
def test_known_values(count_primes: Kernel, start: int, stop: int, expected: int) -> None:
    assert count_primes(start, stop) == expected


def test_window_below_1e12_by_trial_division() -> None:
    primes = [n for n in range(MAX_STOP - 100, MAX_STOP) if _is_prime_by_trial_division(n)]
    assert primes[-1] == MAX_STOP - 11
    assert len(primes) == PRIMES_BELOW_1E12_WINDOW


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(start=st.integers(0, 5000), width=st.integers(0, 3000))
def test_reference_matches_trial_division_near_zero(start: int, width: int) -> None:
    stop = start + width
    expected = sum(1 for n in range(start, stop) if _is_prime_by_trial_division(n))
    assert primes_py.count_primes(start, stop) == expected


def test_compiled_match_reference_near_zero() -> None:
    kernels = kernel_impls.compiled("primes", "count_primes")

    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(start=st.integers(0, 5000), width=st.integers(0, 5000))
    def check(start: int, width: int) -> None:
        expected = primes_py.count_primes(start, start + width)
        for name, kernel in kernels.items():
            assert kernel(start, start + width) == expected, name

    check()


def test_compiled_match_reference_anywhere() -> None:
    kernels = kernel_impls.compiled("primes", "count_primes")

    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(start=_starts(MAX_STOP), width=st.integers(0, 20_000))
    @example(start=MAX_STOP - 20_000, width=20_000)
    @example(start=MAX_STOP, width=0)
    def check(start: int, width: int) -> None:
        stop = min(start + width, MAX_STOP)
        expected = primes_py.count_primes(start, stop)
        for name, kernel in kernels.items():
            assert kernel(start, stop) == expected, name

    check()


def test_compiled_match_reference_across_segments() -> None:
    kernels = kernel_impls.compiled("primes", "count_primes")

    @settings(max_examples=8, deadline=None, derandomize=True, database=None)
    @given(start=_starts(MAX_STOP - MULTI_SEGMENT_WIDTH))
    @example(start=MAX_STOP - MULTI_SEGMENT_WIDTH)
    def check(start: int) -> None:
        stop = start + MULTI_SEGMENT_WIDTH
        expected = primes_py.count_primes(start, stop)
        for name, kernel in kernels.items():
            assert kernel(start, stop) == expected, name

    check()
