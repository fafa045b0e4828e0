"""Numba ``julia.tile`` kernel: the escape-time loop of julia_py, compiled, GIL-free.

No fastmath: without it LLVM neither reassociates nor fuses multiply-adds, so the counts are
bit-identical to julia_py's.
"""

import numba
import numpy as np
import numpy.typing as npt

MAX_COUNT = 0xFFFF  # counts are uint16


@numba.njit(nogil=True, cache=True)
def _escape_counts(
    width: int,
    height: int,
    x_min: float,
    x_max: float,
    y_min: float,
    y_max: float,
    c_re: float,
    c_im: float,
    max_iter: int,
    out: npt.NDArray[np.uint16],
) -> None:
    dx = x_max - x_min
    dy = y_max - y_min
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
            out[j * width + i] = n


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
    width, height, max_iter = int(width), int(height), int(max_iter)
    if width < 2 or height < 2:
        raise ValueError(f"width and height must be >= 2 (got {width} x {height})")
    if not 0 <= max_iter <= MAX_COUNT:
        raise ValueError(f"max_iter must be in [0, {MAX_COUNT}] (got {max_iter})")
    out = np.empty(width * height, dtype=np.uint16)
    _escape_counts(
        width,
        height,
        float(x_min),
        float(x_max),
        float(y_min),
        float(y_max),
        float(c_re),
        float(c_im),
        max_iter,
        out,
    )
    return out


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the kernel now rather than on the first job."""
    escape_counts(2, 2, -1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 1)
