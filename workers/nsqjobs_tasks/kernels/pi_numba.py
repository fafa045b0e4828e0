"""Numba ``pi.estimate`` kernel: the quarter-circle count of pi_py, compiled, GIL-free."""

import numba
import numpy as np

from nsqjobs_tasks.kernels.splitmix_numba import mix, next_state

# uint64 constants throughout: an int64 operand next to a uint64 one would promote to float64.
SHIFT = np.uint64(33)
RADIUS_SQUARED = np.uint64(1 << 62)  # (2**31)**2; x*x + y*y < 2**63 cannot wrap


@numba.njit(nogil=True, cache=True)
def _count_inside(samples: np.int64, seed: np.uint64) -> int:
    state = seed
    inside = 0
    for _ in range(samples):
        state = next_state(state)
        x = mix(state) >> SHIFT
        state = next_state(state)
        y = mix(state) >> SHIFT
        if x * x + y * y < RADIUS_SQUARED:
            inside += 1
    return inside


def count_inside(samples: int, seed: int) -> int:
    """Return how many of ``samples`` splitmix64 points of ``seed`` fall inside the quarter
    circle (x*x + y*y < 2**62 on 31-bit coordinates); 0 when samples <= 0.

    ``seed`` must be in [0, 2**64) (OverflowError otherwise), ``samples`` below 2**63.
    """
    # Fixed argument types: one compiled specialisation, whatever int subclass the caller passes.
    return int(_count_inside(np.int64(samples), np.uint64(seed)))


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the kernel now rather than on the first job."""
    count_inside(1, 0)
