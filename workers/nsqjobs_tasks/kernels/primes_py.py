"""Pure-Python reference for ``primes.count``: an odd-only segmented sieve of Eratosthenes."""

from math import isqrt

# One sieve cell per odd number, so a segment spans twice this many integers. The same value is
# used by the Numba and Cython kernels (where it was tuned) so all three run the same algorithm.
SEGMENT_CELLS = 1 << 18


def odd_base_primes(limit: int) -> list[int]:
    """Return the odd primes p <= limit, found by a simple sieve of Eratosthenes."""
    if limit < 3:
        return []
    # Even cells are allocated but never read: indexing by the number itself keeps it readable.
    is_prime = [True] * (limit + 1)
    primes = []
    for p in range(3, limit + 1, 2):
        if is_prime[p]:
            primes.append(p)
            # Smaller multiples were crossed off by smaller primes; even ones are never read.
            for m in range(p * p, limit + 1, 2 * p):
                is_prime[m] = False
    return primes


def count_primes(start: int, stop: int) -> int:
    """Return the number of primes p with start <= p < stop (0 for an empty range)."""
    if stop <= start or stop <= 2:
        return 0
    count = 1 if start <= 2 else 0  # 2 is the only even prime; the sieve below is odd-only.
    lo = max(start, 3) | 1  # first odd number to sieve; starting at 3 keeps 1 out
    if lo >= stop:
        return count
    total = (stop - lo + 1) // 2  # odd numbers lo, lo + 2, ... below stop; cell i is lo + 2 * i

    primes = odd_base_primes(isqrt(stop - 1))
    # next_cell[k]: cell of the next odd multiple of primes[k] to cross off, relative to the
    # current segment. Starting at p * p keeps p itself (when p >= start) from being crossed off.
    next_cell = []
    for p in primes:
        m = max(p * p, (lo + p - 1) // p * p)
        if m % 2 == 0:
            m += p
        next_cell.append((m - lo) // 2)

    done = 0
    while done < total:
        n = min(SEGMENT_CELLS, total - done)
        sieve = [True] * n
        for k in range(len(primes)):
            p = primes[k]
            j = next_cell[k]
            # Consecutive odd multiples of p are 2 * p apart, i.e. p cells.
            while j < n:
                sieve[j] = False
                j += p
            next_cell[k] = j - n
        for cell in sieve:
            if cell:
                count += 1
        done += n
    return count
