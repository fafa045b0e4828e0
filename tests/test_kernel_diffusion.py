"""Tests for the diffusion.run kernels: invariants of the scheme, and the three kernels agreeing.

The kernels perform the same IEEE double operations in the same order (no fastmath, no FMA
contraction, sequential reductions), so the compiled ones must match the reference bit for bit:
the comparisons below are exact, not within a tolerance.
"""

import math
from collections.abc import Callable
from itertools import pairwise
from typing import cast

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from nsqjobs_tasks.kernels import diffusion_py, splitmix_py

from tests import kernel_impls

Stats = tuple[float, float, float]
Kernel = Callable[[int, int, float, float, int], Stats]

COMPILED = kernel_impls.COMPILED
MAX_SEED = 2**64 - 1
# The maximum principle holds exactly in real arithmetic for d * dt <= 0.25. In doubles the four
# neighbour sums can round up by an ulp of 4, which r <= 0.25 scales to about one ulp of the
# values (all in [0, 1)), so allow a few ulps; no case here has ever needed it.
MAX_PRINCIPLE_SLACK = 1e-15
# Rounding in each step changes the total by a few ulps; its relative drift stays far below this.
MASS_RELATIVE_TOLERANCE = 1e-12


@pytest.fixture(params=["python", *COMPILED])
def run(request: pytest.FixtureRequest) -> Kernel:
    """Each kernel in turn; a compiled one that cannot be imported skips (fails under CI)."""
    name = cast(str, request.param)
    if name == "python":
        return diffusion_py.run
    return cast(Kernel, kernel_impls.param("diffusion", "run", name))


def _initial_stats(n: int, seed: int) -> Stats:
    """(mean, max, checksum) of the initial field, computed here without diffusion_py."""
    # ldexp(k, -53) == k * 2**-53 exactly: the top 53 bits of each output scaled into [0, 1).
    u = [math.ldexp(x >> 11, -53) for x in splitmix_py.stream(seed, n * n)]
    total = 0.0
    checksum = 0.0
    for idx, x in enumerate(u):  # one accumulator, in order (sum() is compensated on 3.12+)
        total += x
        checksum += x * (idx % 7 + 1)
    return total / (n * n), max(u), checksum


@pytest.mark.parametrize(
    ("n", "seed"), [(2, 0), (3, 1), (7, 12345), (16, MAX_SEED), (33, 2**63), (64, 42)]
)
def test_zero_steps_returns_initial_stats(run: Kernel, n: int, seed: int) -> None:
    assert run(n, 0, 1.0, 0.2, seed) == _initial_stats(n, seed)


@pytest.mark.parametrize(("n", "steps"), [(2, 50), (5, 200), (16, 300)])
@pytest.mark.parametrize("r", [0.25, 0.2, 0.013])
def test_mass_is_conserved(run: Kernel, n: int, steps: int, r: float) -> None:
    initial_mean = _initial_stats(n, 99)[0]
    mean, _, _ = run(n, steps, 1.0, r, 99)
    assert mean == pytest.approx(initial_mean, rel=MASS_RELATIVE_TOLERANCE, abs=0.0)


@pytest.mark.parametrize(("n", "seed"), [(2, 3), (3, 5), (9, 77), (12, MAX_SEED)])
@pytest.mark.parametrize("r", [0.25, 0.2, 0.07])
def test_max_never_increases(run: Kernel, n: int, seed: int, r: float) -> None:
    peaks = [run(n, steps, 2.0, r / 2.0, seed)[1] for steps in range(25)]
    assert peaks[0] < 1.0
    for before, after in pairwise(peaks):
        assert after <= before + MAX_PRINCIPLE_SLACK


def test_field_relaxes_to_its_mean(run: Kernel) -> None:
    # At r = 0.2 every non-constant Fourier mode of an 8 x 8 grid decays by a factor of at most
    # 0.88 per step (r = 0.25 would not do: the checkerboard mode then flips sign forever).
    mean, peak, _ = run(8, 300, 1.0, 0.2, 2024)
    assert peak - mean < 1e-12
    assert mean == pytest.approx(_initial_stats(8, 2024)[0], rel=MASS_RELATIVE_TOLERANCE)


@pytest.mark.parametrize("n", [-1, 0, 1])
def test_grid_below_two_is_rejected(run: Kernel, n: int) -> None:
    with pytest.raises(ValueError, match="n must be at least 2"):
        run(n, 1, 1.0, 0.1, 0)


def test_compiled_match_reference_exactly() -> None:
    kernels = kernel_impls.compiled("diffusion", "run")

    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(
        n=st.integers(2, 24),
        steps=st.integers(0, 30),
        d=st.floats(1e-3, 1e3),
        # r = d * dt as a fraction of the stability limit 0.25, then dt = r / d.
        fraction=st.floats(0.0, 1.0, exclude_min=True),
        seed=st.integers(0, MAX_SEED),
    )
    @example(n=2, steps=30, d=1.0, fraction=1.0, seed=MAX_SEED)
    @example(n=24, steps=30, d=4.0, fraction=1.0, seed=0)
    @example(n=3, steps=0, d=1.0, fraction=0.5, seed=1)
    def check(n: int, steps: int, d: float, fraction: float, seed: int) -> None:
        dt = 0.25 * fraction / d
        assume(0.0 < d * dt <= 0.25)
        expected = diffusion_py.run(n, steps, d, dt, seed)
        for name, kernel in kernels.items():
            assert kernel(n, steps, d, dt, seed) == expected, name

    check()


def test_compiled_kernels_agree_on_a_larger_grid() -> None:
    kernels = kernel_impls.compiled("diffusion", "run")
    if len(kernels) < 2:
        pytest.skip("needs both compiled kernels")
    results = {name: kernel(128, 100, 1.0, 0.2, 7) for name, kernel in kernels.items()}
    assert results["numba"] == results["cython"]
    mean, peak, _ = results["numba"]
    assert mean == pytest.approx(_initial_stats(128, 7)[0], rel=MASS_RELATIVE_TOLERANCE)
    assert mean < peak < 1.0
