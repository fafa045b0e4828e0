# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython ``primes.count`` kernel: the odd-only segmented sieve of primes_py, run without the GIL."""

from libc.math cimport sqrt
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

# Same segment as primes_py / primes_numba (tuned there).
cdef enum:
    SEGMENT_CELLS = 1 << 18


cdef inline int64_t _isqrt(int64_t x) noexcept nogil:
    # Float sqrt is exact to within one for x <= 10**12; the loops fix the rounding.
    cdef int64_t r = <int64_t>sqrt(<double>x)
    while r * r > x:
        r -= 1
    while (r + 1) * (r + 1) <= x:
        r += 1
    return r


cdef int64_t _odd_base_primes(int64_t limit, uint8_t *is_prime, int64_t *primes) noexcept nogil:
    # Writes the odd primes p <= limit into primes and returns how many there are.
    cdef int64_t n_primes = 0
    cdef int64_t p, m
    if limit < 3:
        return 0
    memset(is_prime, 1, limit + 1)
    p = 3
    while p <= limit:
        if is_prime[p]:
            primes[n_primes] = p
            n_primes += 1
            m = p * p
            while m <= limit:
                is_prime[m] = 0
                m += 2 * p
        p += 2
    return n_primes


cdef int64_t _sieve_window(
    int64_t lo,
    int64_t total,
    const int64_t *primes,
    int64_t n_primes,
    int64_t *next_cell,
    uint8_t *sieve,
) noexcept nogil:
    # Counts the primes among the odd numbers lo + 2 * i, 0 <= i < total.
    cdef int64_t count = 0
    cdef int64_t done = 0
    cdef int64_t k, p, m, j, n, i
    for k in range(n_primes):
        p = primes[k]
        m = (lo + p - 1) // p * p
        if m < p * p:
            m = p * p
        if m % 2 == 0:
            m += p
        next_cell[k] = (m - lo) // 2
    while done < total:
        n = total - done
        if n > SEGMENT_CELLS:
            n = SEGMENT_CELLS
        memset(sieve, 1, n)
        for k in range(n_primes):
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


cdef int64_t _count_primes(int64_t start, int64_t stop) noexcept nogil:
    # Returns -1 when an allocation fails: the caller raises MemoryError once it holds the GIL.
    cdef int64_t count, lo, total, limit, n_primes, odd_slots
    cdef uint8_t *is_prime
    cdef uint8_t *sieve
    cdef int64_t *primes
    cdef int64_t *next_cell

    if stop <= start or stop <= 2:
        return 0
    count = 1 if start <= 2 else 0
    lo = (start if start > 3 else 3) | 1
    if lo >= stop:
        return count
    total = (stop - lo + 1) // 2

    limit = _isqrt(stop - 1)
    odd_slots = limit // 2 + 1  # bound on the number of odd primes <= limit
    is_prime = <uint8_t *>malloc(limit + 1)
    primes = <int64_t *>malloc(odd_slots * sizeof(int64_t))
    next_cell = <int64_t *>malloc(odd_slots * sizeof(int64_t))
    sieve = <uint8_t *>malloc(SEGMENT_CELLS)
    if is_prime == NULL or primes == NULL or next_cell == NULL or sieve == NULL:
        count = -1
    else:
        n_primes = _odd_base_primes(limit, is_prime, primes)
        count += _sieve_window(lo, total, primes, n_primes, next_cell, sieve)
    free(is_prime)
    free(primes)
    free(next_cell)
    free(sieve)
    return count


def count_primes(long long start, long long stop) -> int:
    """Return the number of primes p with start <= p < stop (0 for an empty range)."""
    cdef int64_t count
    with nogil:
        count = _count_primes(start, stop)
    if count < 0:
        raise MemoryError("primes.count: could not allocate the sieve buffers")
    return count
