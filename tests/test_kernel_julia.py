"""Tests for the julia.tile kernels: hand-checked grids, and compiled kernels against the reference.

All implementations do the same floating-point operations in the same order, with no fused
multiply-add, so they must agree bit for bit: every comparison here is exact.
"""

from collections.abc import Callable
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nsqjobs_tasks.kernels import julia_py

from tests import kernel_impls

Counts = npt.NDArray[np.uint16]
Kernel = Callable[[int, int, float, float, float, float, float, float, int], Counts]
Grid = tuple[int, int, float, float, float, float, float, float, int]

COMPILED = kernel_impls.COMPILED
# A 2 x 2 grid whose last point is fragile: one rounding fewer per step changes its count. A
# build that fuses (2.0 * zr) * zi + c_im into one FMA returns 284 for it instead of 285: found
# by comparing bench/c/julia.c built with gcc -march=native (on a CPU with FMA, as GCC's default
# -ffp-contract=fast then fuses) against the plain build. The random grids below never caught it.
FMA_SENSITIVE_GRID: Grid = (2, 2, 0.28, 0.281, 0.196, 0.197, -0.8, 0.156, 300)
FMA_SENSITIVE_COUNTS = [71, 79, 88, 285]


def _escape_by_complex(z: complex, c: complex, max_iter: int) -> int:
    """Escape count of one point with Python complex numbers: an independent formulation.

    It rounds like the kernels: the real part of z * z + c is (a*a - b*b) + c.real, and the
    imaginary part a*b + b*a = 2 * (a*b) equals (2*a) * b, since doubling is exact. (Not quite
    when a*b is subnormal, but a difference of 1e-323 in z.imag is far too small to show.)
    """
    for n in range(max_iter):
        if z.real * z.real + z.imag * z.imag > 4.0:
            return n
        z = z * z + c
    return max_iter


def _intervals() -> st.SearchStrategy[tuple[float, float]]:
    """Pairs lo < hi in [-2, 2]."""
    coord = st.floats(-2.0, 2.0)
    return st.tuples(coord, coord).filter(lambda p: p[0] != p[1]).map(lambda p: (min(p), max(p)))


@st.composite
def _grids(draw: st.DrawFn, max_side: int) -> Grid:
    """Small random grids over [-2, 2]^2 with c in [-1, 1]^2 and up to 300 iterations."""
    (x_min, x_max), (y_min, y_max) = draw(_intervals()), draw(_intervals())
    return (
        draw(st.integers(2, max_side)),
        draw(st.integers(2, max_side)),
        x_min,
        x_max,
        y_min,
        y_max,
        draw(st.floats(-1.0, 1.0)),
        draw(st.floats(-1.0, 1.0)),
        draw(st.integers(1, 300)),
    )


@pytest.fixture(params=["python", *COMPILED])
def escape_counts(request: pytest.FixtureRequest) -> Kernel:
    """Each kernel in turn; a compiled one that cannot be imported skips (fails under CI)."""
    name = cast(str, request.param)
    if name == "python":
        return julia_py.escape_counts
    return cast(Kernel, kernel_impls.param("julia", "escape_counts", name))


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        # c = 0 on x in {0, 1, 2}, y in {0, 1}: |z| <= 1 stays bounded; 2 has |z|**2 == 4, which
        # is not > 4, so it takes one step (to 4) before escaping; 1 + i -> 2i (|z|**2 == 4,
        # one more step) -> -4; 2 + i starts outside.
        ((3, 2, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 10), [10, 10, 1, 10, 2, 0]),
        # c = -1: 0 and 1 fall into the cycle 0 <-> -1; 2 -> 3; i -> -2 -> 3; 1 + i -> -1 + 2i.
        ((3, 2, 0.0, 2.0, 0.0, 1.0, -1.0, 0.0, 10), [10, 10, 1, 2, 1, 0]),
        # c = -1 on x in {-1, 0, 1}: -1 + i -> -1 - 2i, and the rest as above, mirrored.
        ((3, 2, -1.0, 1.0, 0.0, 1.0, -1.0, 0.0, 5), [5, 5, 5, 1, 2, 1]),
        # c = i: 0 -> i -> -1 + i -> -i -> -1 + i (a cycle); 1 -> 1 + i -> 3i; 1 + i -> 3i.
        ((2, 2, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 10), [10, 2, 10, 1]),
        # max_iter == 0: nothing is iterated, not even the point that starts outside.
        ((2, 2, 0.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0), [0, 0, 0, 0]),
        (FMA_SENSITIVE_GRID, FMA_SENSITIVE_COUNTS),
    ],
)
def test_known_grids(escape_counts: Kernel, grid: Grid, expected: list[int]) -> None:
    counts = escape_counts(*grid)
    assert counts.dtype == np.uint16
    assert counts.shape == (grid[0] * grid[1],)
    assert counts.tolist() == expected


def test_points_outside_radius_2_escape_at_once(escape_counts: Kernel) -> None:
    # Every x is > 2, so |z|**2 > 4 before the first step, whatever c and max_iter are.
    counts = escape_counts(17, 11, 2.01, 9.0, -5.0, 5.0, 0.3, -0.7, 10_000)
    assert counts.shape == (17 * 11,)
    assert not counts.any()


def test_unit_disk_with_c_zero_never_escapes(escape_counts: Kernel) -> None:
    # |x + iy| <= 0.7 * sqrt(2) < 1 on this grid, and z <- z * z keeps |z| <= 1.
    counts = escape_counts(23, 19, -0.7, 0.7, -0.7, 0.7, 0.0, 0.0, 250)
    assert counts.shape == (23 * 19,)
    assert (counts == 250).all()


def test_max_iter_fits_uint16(escape_counts: Kernel) -> None:
    counts = escape_counts(2, 2, -0.5, 0.5, -0.5, 0.5, 0.0, 0.0, 0xFFFF)
    assert counts.tolist() == [0xFFFF] * 4


@pytest.mark.parametrize(
    ("width", "height", "max_iter"), [(1, 5, 10), (5, 1, 10), (0, 0, 10), (4, 4, -1), (4, 4, 65536)]
)
def test_rejects_bad_arguments(
    escape_counts: Kernel, width: int, height: int, max_iter: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        escape_counts(width, height, -1.0, 1.0, -1.0, 1.0, 0.0, 0.0, max_iter)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(grid=_grids(max_side=12))
def test_reference_matches_complex_arithmetic(grid: Grid) -> None:
    width, height, x_min, x_max, y_min, y_max, c_re, c_im, max_iter = grid
    c = complex(c_re, c_im)
    expected = [
        _escape_by_complex(
            complex(
                x_min + (i * (x_max - x_min)) / (width - 1),
                y_min + (j * (y_max - y_min)) / (height - 1),
            ),
            c,
            max_iter,
        )
        for j in range(height)
        for i in range(width)
    ]
    counts = julia_py.escape_counts(width, height, x_min, x_max, y_min, y_max, c_re, c_im, max_iter)
    assert counts.tolist() == expected


def test_compiled_match_reference_on_small_grids() -> None:
    kernels = kernel_impls.compiled("julia", "escape_counts")

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None)
    @given(grid=_grids(max_side=40))
    def check(grid: Grid) -> None:
        expected = julia_py.escape_counts(*grid)
        for name, kernel in kernels.items():
            counts = kernel(*grid)
            assert counts.dtype == np.uint16, name
            np.testing.assert_array_equal(counts, expected, err_msg=name)

    check()


@pytest.mark.parametrize(
    "grid",
    [
        # 120,000 points, about 3.9 million steps: the reference takes about 0.3 s.
        (400, 300, -1.5, 1.5, -1.0, 1.0, -0.8, 0.156, 200),
        # Orbits up to 586 steps long: a build with FMA (see FMA_SENSITIVE_GRID) differs from the
        # reference on 25 points here, and on none in the grid above or in thousands of the
        # random small grids.
        (400, 300, -1.5, 1.5, -1.0, 1.0, -0.4, 0.6, 1000),
    ],
)
def test_compiled_match_reference_on_a_large_grid(grid: Grid) -> None:
    kernels = kernel_impls.compiled("julia", "escape_counts")
    expected = julia_py.escape_counts(*grid)
    assert expected.min() < 10 and expected.max() > 150  # short and long orbits both occur
    for name, kernel in kernels.items():
        np.testing.assert_array_equal(kernel(*grid), expected, err_msg=name)
