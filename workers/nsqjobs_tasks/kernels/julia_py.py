"""Pure-Python reference for ``julia.tile``: escape-time counts of z <- z * z + c on a grid.

Every implementation (this one, Numba, Cython and bench/c/julia.c) does the floating-point
operations in exactly the order below, without fused multiply-adds or reassociation, so all of
them return bit-identical counts.
"""

import numpy as np
import numpy.typing as npt

# Counts are returned as uint16; the task layer caps max_iter at 10_000, well inside it.
MAX_COUNT = 0xFFFF


def check_args(width: int, height: int, max_iter: int) -> None:
    """Raise ValueError unless the grid has two points per axis and the counts fit uint16."""
    if width < 2 or height < 2:
        raise ValueError(f"width and height must be >= 2 (got {width} x {height})")
    if not 0 <= max_iter <= MAX_COUNT:
        raise ValueError(f"max_iter must be in [0, {MAX_COUNT}] (got {max_iter})")


def escape_counts(
    width: int,
    height: int,
    x_min: float,
    x_max: float,
    y_min: float,
    y_max: float,
    c_re: float,
    c_im: float,
    max_iter: int,
) -> npt.NDArray[np.uint16]:
    """Return the escape-time count of every grid point, row-major (index j * width + i).

    Point (i, j) is x_min + i * (x_max - x_min) / (width - 1) + (y_min + j * ...) * 1j, so the
    grid includes both ends of each axis. Its count is the number of steps z <- z * z + c taken
    before |z|**2 > 4 (tested before each step), at most max_iter.
    """
    check_args(width, height, max_iter)
    dx = x_max - x_min
    dy = y_max - y_min
    counts: list[int] = []
    for j in range(height):
        y = y_min + (float(j) * dy) / float(height - 1)
        for i in range(width):
            x = x_min + (float(i) * dx) / float(width - 1)
            zr = x
            zi = y
            n = 0
            while n < max_iter:
                zr2 = zr * zr
                zi2 = zi * zi
                if zr2 + zi2 > 4.0:
                    break
                zi = (2.0 * zr) * zi + c_im
                zr = (zr2 - zi2) + c_re
                n += 1
            counts.append(n)
    return np.array(counts, dtype=np.uint16)
