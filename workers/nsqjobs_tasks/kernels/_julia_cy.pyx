# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython ``julia.tile`` kernel: the escape-time loop of julia_py, run without the GIL.

Built without -march or -ffast-math (see setup.py): on x86-64 GCC then has no fused multiply-add
to contract into and keeps the operation order, so the counts are bit-identical to julia_py's.
"""

import numpy as np

# Counts are returned as uint16.
cdef enum:
    MAX_COUNT = 0xFFFF


def escape_counts(
    int width,
    int height,
    double x_min,
    double x_max,
    double y_min,
    double y_max,
    double c_re,
    double c_im,
    int max_iter,
):
    """Return the escape-time count of every grid point, row-major (index j * width + i).

    Point (i, j) is x_min + i * (x_max - x_min) / (width - 1) + (y_min + j * ...) * 1j, so the
    grid includes both ends of each axis. Its count is the number of steps z <- z * z + c taken
    before |z|**2 > 4 (tested before each step), at most max_iter.
    """
    cdef Py_ssize_t i, j, row
    cdef int n
    cdef double dx, dy, x, y, zr, zi, zr2, zi2
    cdef unsigned short[::1] out

    if width < 2 or height < 2:
        raise ValueError(f"width and height must be >= 2 (got {width} x {height})")
    if not 0 <= max_iter <= MAX_COUNT:
        raise ValueError(f"max_iter must be in [0, {MAX_COUNT}] (got {max_iter})")
    counts = np.empty(<Py_ssize_t>width * height, dtype=np.uint16)
    out = counts
    dx = x_max - x_min
    dy = y_max - y_min
    with nogil:
        for j in range(height):
            y = y_min + (<double>j * dy) / <double>(height - 1)
            row = j * width
            for i in range(width):
                x = x_min + (<double>i * dx) / <double>(width - 1)
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
                out[row + i] = <unsigned short>n
    return counts
