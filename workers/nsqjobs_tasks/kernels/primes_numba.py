"""Numba ``primes.count`` kernel: the odd-only segmented sieve of primes_py, compiled, GIL-free."""

import numba
import numpy as np
import numpy.typing as npt

# Same segment as primes_py so the three kernels run the same algorithm. Every segment walks all
# base primes (78k below 10**6), so near 10**12 bigger segments win: 256 KiB (still inside L2)
# measured 0.10 s vs 0.18 s at 32 KiB on [10**12 - 10**8, 10**12); small ranges do not care.
SEGMENT_CELLS = 1 << 18


@numba.njit(nogil=True, cache=True)
def _isqrt(x: int) -> int:
    # Float sqrt is exact to within one for x <= 10**12; the loops fix the rounding.
    r = int(np.sqrt(float(x)))
    while r * r > x:
        r -= 1
    while (r + 1) * (r + 1) <= x:
        r += 1
    return r


@numba.njit(nogil=True, cache=True)
def _odd_base_primes(limit: int) -> npt.NDArray[np.int64]:
    if limit < 3:
        return np.empty(0, dtype=np.int64)
    is_prime = np.ones(limit + 1, dtype=np.uint8)
    primes = np.empty((limit + 1) // 2, dtype=np.int64)
    count = 0
    for p in range(3, limit + 1, 2):
        if is_prime[p]:
            primes[count] = p
            count += 1
            for m in range(p * p, limit + 1, 2 * p):
                is_prime[m] = 0
    return primes[:count].copy()


@numba.njit(nogil=True, cache=True)
def _count_primes(start: int, stop: int) -> int:
    if stop <= start or stop <= 2:
        return 0
    count = 1 if start <= 2 else 0
    lo = max(start, 3) | 1
    if lo >= stop:
        return count
    total = (stop - lo + 1) // 2

    primes = _odd_base_primes(_isqrt(stop - 1))
    next_cell = np.empty(primes.shape[0], dtype=np.int64)
    for k in range(primes.shape[0]):
        p = primes[k]
        m = max(p * p, (lo + p - 1) // p * p)
        if m % 2 == 0:
            m += p
        next_cell[k] = (m - lo) // 2

    sieve = np.empty(SEGMENT_CELLS, dtype=np.uint8)
    done = 0
    while done < total:
        n = min(SEGMENT_CELLS, total - done)
        sieve[:n] = 1
        for k in range(primes.shape[0]):
            p = primes[k]
            j = next_cell[k]
            while j < n:
                sieve[j] = 0
                j += p
            next_cell[k] = j - n
        for i in range(n):
            count += sieve[i]
        done += n
    return count


def count_primes(start: int, stop: int) -> int:
    """Return the number of primes p with start <= p < stop (0 for an empty range)."""
    return int(_count_primes(int(start), int(stop)))


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the kernel now rather than on the first job."""
    count_primes(0, 100)
