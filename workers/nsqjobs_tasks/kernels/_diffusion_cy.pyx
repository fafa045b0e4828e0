# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython ``diffusion.run`` kernel: the periodic 5-point diffusion of diffusion_py, GIL-free.

Bit-identical to diffusion_py as long as the C compiler neither reassociates (no -ffast-math) nor
contracts ``c + r * lap`` into an FMA: setup.py passes no -march, and baseline x86-64 has no FMA.
"""

import numpy as np

from libc.stdint cimport uint64_t

from nsqjobs_tasks.kernels.splitmix cimport mix, next_state

# Same constants as diffusion_py.
cdef enum:
    SHIFT = 11
    CHECKSUM_PERIOD = 7

cdef double UNIT = 1.0 / 9007199254740992.0  # 2**-53


cdef inline void _step_row(
    const double *up,
    const double *mid,
    const double *down,
    double *out,
    Py_ssize_t n,
    double r,
) noexcept nogil:
    # The wrapped columns 0 and n - 1 are peeled so the interior loop has no branch (n >= 2).
    cdef double c
    cdef Py_ssize_t j
    c = mid[0]
    out[0] = c + r * ((((up[0] + down[0]) + mid[n - 1]) + mid[1]) - 4.0 * c)
    for j in range(1, n - 1):
        c = mid[j]
        out[j] = c + r * ((((up[j] + down[j]) + mid[j - 1]) + mid[j + 1]) - 4.0 * c)
    c = mid[n - 1]
    out[n - 1] = c + r * ((((up[n - 1] + down[n - 1]) + mid[n - 2]) + mid[0]) - 4.0 * c)


cdef void _run(
    Py_ssize_t n,
    long long steps,
    double r,
    uint64_t seed,
    double *u,
    double *v,
    double *out3,
) noexcept nogil:
    # u and v are two row-major n * n buffers; the result is (mean, max, checksum) in out3.
    cdef uint64_t state = seed
    cdef Py_ssize_t i, idx, im, ip
    cdef long long s
    cdef double *tmp
    cdef double x, total, peak, checksum

    for idx in range(n * n):
        state = next_state(state)
        u[idx] = <double>(mix(state) >> SHIFT) * UNIT

    for s in range(steps):
        for i in range(n):
            im = i - 1 if i > 0 else n - 1
            ip = i + 1 if i < n - 1 else 0
            _step_row(u + im * n, u + i * n, u + ip * n, v + i * n, n, r)
        tmp = u
        u = v
        v = tmp

    total = 0.0
    peak = u[0]
    checksum = 0.0
    for idx in range(n * n):
        x = u[idx]
        total += x
        if x > peak:
            peak = x
        checksum += x * <double>(idx % CHECKSUM_PERIOD + 1)
    out3[0] = total / <double>(n * n)
    out3[1] = peak
    out3[2] = checksum


def run(Py_ssize_t n, long long steps, double d, double dt, unsigned long long seed) -> tuple:
    """Diffuse the splitmix64 field of ``seed`` on a periodic n x n grid for ``steps`` explicit
    steps of ``u += d * dt * laplacian(u)`` and return the (mean, max, checksum) of the result.

    Same contract as diffusion_py.run: ``n`` >= 2 (ValueError otherwise), d * dt <= 0.25 checked
    by the caller, ``seed`` in [0, 2**64) (a negative one raises OverflowError).
    """
    if n < 2:
        raise ValueError(f"diffusion.run: n must be at least 2, got {n}")
    cdef double[::1] u = np.empty(n * n, dtype=np.float64)
    cdef double[::1] v = np.empty(n * n, dtype=np.float64)
    cdef double[3] out3
    cdef double r = d * dt
    with nogil:
        _run(n, steps, r, seed, &u[0], &v[0], &out3[0])
    return out3[0], out3[1], out3[2]
