# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython ``pi.estimate`` kernel: the quarter-circle count of pi_py, run without the GIL."""

from libc.stdint cimport uint64_t

from nsqjobs_tasks.kernels.splitmix cimport mix, next_state

# Same shift as pi_py: 31-bit coordinates, so x*x + y*y < 2**63 cannot wrap in uint64.
cdef enum:
    SHIFT = 33


cdef uint64_t _count_inside(uint64_t samples, uint64_t seed) noexcept nogil:
    # A local, not a module global, so the C compiler sees a constant: (2**31)**2.
    cdef uint64_t radius_squared = (<uint64_t>1) << 62
    cdef uint64_t state = seed
    cdef uint64_t inside = 0
    cdef uint64_t i, x, y
    for i in range(samples):
        state = next_state(state)
        x = mix(state) >> SHIFT
        state = next_state(state)
        y = mix(state) >> SHIFT
        if x * x + y * y < radius_squared:
            inside += 1
    return inside


def count_inside(unsigned long long samples, unsigned long long seed) -> int:
    """Return how many of ``samples`` splitmix64 points of ``seed`` fall inside the quarter
    circle (x*x + y*y < 2**62 on 31-bit coordinates).

    Both arguments must be in [0, 2**64): a negative one raises OverflowError.
    """
    cdef uint64_t inside
    with nogil:
        inside = _count_inside(samples, seed)
    return inside
