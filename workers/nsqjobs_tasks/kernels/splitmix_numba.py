"""splitmix64 for Numba kernels: uint64 throughout (mixing in int64 would promote to float)."""

import numba
import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MUL1 = np.uint64(0xBF58476D1CE4E5B9)
MUL2 = np.uint64(0x94D049BB133111EB)
S27, S30, S31 = np.uint64(27), np.uint64(30), np.uint64(31)


@numba.njit(nogil=True, cache=True, inline="always")
def next_state(state: np.uint64) -> np.uint64:
    """Advance the state (uint64 addition wraps mod 2**64)."""
    return state + GAMMA


@numba.njit(nogil=True, cache=True, inline="always")
def mix(state: np.uint64) -> np.uint64:
    """The output for an already-advanced ``state``."""
    z = state
    z = (z ^ (z >> S30)) * MUL1
    z = (z ^ (z >> S27)) * MUL2
    return z ^ (z >> S31)
