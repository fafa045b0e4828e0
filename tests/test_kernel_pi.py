"""Tests for the pi.estimate kernels: known counts, and all three kernels agreeing bit for bit."""

import math
from collections.abc import Callable
from typing import cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nsqjobs_tasks.kernels import pi_py

from tests import kernel_impls

Kernel = Callable[[int, int], int]

MAX_SEED = 2**64 - 1
COMPILED = kernel_impls.COMPILED
# The first three splitmix64 outputs for seed 0, as published with the reference C code.
SPLITMIX64_SEED0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@pytest.fixture(params=["python", *COMPILED])
def count_inside(request: pytest.FixtureRequest) -> Kernel:
    """Each kernel in turn; a compiled one that cannot be imported skips (fails under CI)."""
    name = cast(str, request.param)
    if name == "python":
        return pi_py.count_inside
    return cast(Kernel, kernel_impls.param("pi", "count_inside", name))


def _splitmix64(seed: int, n: int) -> list[int]:
    """The first n splitmix64 outputs, written out again: shares no code with the kernels."""
    out = []
    state = seed
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
        out.append(z ^ (z >> 31))
    return out


def _count_inside_inline(samples: int, seed: int) -> int:
    """Count the points in the quarter circle, from the 31-bit tops of output pairs."""
    outputs = _splitmix64(seed, 2 * samples)
    points = zip(outputs[0::2], outputs[1::2], strict=True)
    return sum(1 for a, b in points if (a // 2**33) ** 2 + (b // 2**33) ** 2 < (2**31) ** 2)


def test_inline_splitmix64_matches_published_outputs() -> None:
    assert _splitmix64(0, 3) == SPLITMIX64_SEED0


@pytest.mark.parametrize(
    ("samples", "seed", "expected"),
    [
        (10, 0, 10),
        (20, 0, 17),  # 20 and 1000 also count points outside the circle
        (1000, 0, 807),
        (0, 0, 0),
        (0, MAX_SEED, 0),
        (1, MAX_SEED, 0),  # the first point of 2**64 - 1 lies outside; its state wraps at once
        (10, MAX_SEED, 8),
        (1000, MAX_SEED, 789),
    ],
)
def test_known_values(count_inside: Kernel, samples: int, seed: int, expected: int) -> None:
    assert count_inside(samples, seed) == expected


@pytest.mark.parametrize(
    ("samples", "seed"), [(10, 0), (1000, 0), (10, MAX_SEED), (1000, MAX_SEED)]
)
def test_known_values_by_inline_implementation(samples: int, seed: int) -> None:
    assert _count_inside_inline(samples, seed) == pi_py.count_inside(samples, seed)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(samples=st.integers(0, 300), seed=st.integers(0, MAX_SEED))
def test_reference_matches_inline_implementation(samples: int, seed: int) -> None:
    assert pi_py.count_inside(samples, seed) == _count_inside_inline(samples, seed)


def test_compiled_match_reference() -> None:
    kernels = kernel_impls.compiled("pi", "count_inside")

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(samples=st.integers(0, 5000), seed=st.integers(0, MAX_SEED))
    @example(samples=5000, seed=0)
    @example(samples=5000, seed=MAX_SEED)
    @example(samples=5000, seed=MAX_SEED - 0x9E3779B97F4A7C15 + 1)  # first advance wraps to 0
    def check(samples: int, seed: int) -> None:
        expected = pi_py.count_inside(samples, seed)
        for name, kernel in kernels.items():
            assert kernel(samples, seed) == expected, name

    check()


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_seed_edges_match_reference(seed: int) -> None:
    expected = pi_py.count_inside(5000, seed)
    for name, kernel in kernel_impls.compiled("pi", "count_inside").items():
        assert kernel(5000, seed) == expected, name


def test_compiled_match_reference_at_1e5() -> None:
    expected = pi_py.count_inside(10**5, 1)
    for name, kernel in kernel_impls.compiled("pi", "count_inside").items():
        assert kernel(10**5, 1) == expected, name


def test_estimate_close_to_pi() -> None:
    # One standard error of the estimate is about 0.0016 at 10**6 samples; the seed is fixed.
    samples = 10**6
    counts = {
        name: kernel(samples, 1)
        for name, kernel in kernel_impls.compiled("pi", "count_inside").items()
    }
    assert len(set(counts.values())) == 1, counts
    inside = next(iter(counts.values()))
    assert abs(4 * inside / samples - math.pi) < 0.01
