/* C99 baseline for the primes.count kernels (bench/kernels.py compiles and loads it by ctypes).
 *
 * The same odd-only segmented sieve of Eratosthenes as workers/kernels/primes_py.py,
 * primes_numba.py and _primes_cy.pyx, step for step: base primes up to isqrt(stop - 1) by a plain
 * sieve, one sieve cell per odd number, segments of SEGMENT_CELLS cells (2**18, as there), each
 * base prime carrying its next cell from one segment to the next, a byte per cell summed at the
 * end of each segment. No main(): it is a shared library.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Same segment as primes_py / primes_numba / _primes_cy (tuned there). */
#define SEGMENT_CELLS (1 << 18)

long long count_primes(long long start, long long stop);

static int64_t isqrt64(int64_t x)
{
    /* Float sqrt is exact to within one for x <= 10**12; the loops fix the rounding. */
    int64_t r = (int64_t)sqrt((double)x);
    while (r * r > x)
        r -= 1;
    while ((r + 1) * (r + 1) <= x)
        r += 1;
    return r;
}

/* Writes the odd primes p <= limit into primes and returns how many there are. */
static int64_t odd_base_primes(int64_t limit, uint8_t *is_prime, int64_t *primes)
{
    int64_t n_primes = 0;
    if (limit < 3)
        return 0;
    memset(is_prime, 1, (size_t)(limit + 1));
    for (int64_t p = 3; p <= limit; p += 2) {
        if (is_prime[p]) {
            primes[n_primes++] = p;
            for (int64_t m = p * p; m <= limit; m += 2 * p)
                is_prime[m] = 0;
        }
    }
    return n_primes;
}

/* Counts the primes among the odd numbers lo + 2 * i, 0 <= i < total. */
static int64_t sieve_window(int64_t lo, int64_t total, const int64_t *primes, int64_t n_primes,
                            int64_t *next_cell, uint8_t *sieve)
{
    int64_t count = 0;
    int64_t done = 0;
    for (int64_t k = 0; k < n_primes; k++) {
        int64_t p = primes[k];
        int64_t m = (lo + p - 1) / p * p;
        if (m < p * p)
            m = p * p;
        if (m % 2 == 0)
            m += p;
        next_cell[k] = (m - lo) / 2;
    }
    while (done < total) {
        int64_t n = total - done;
        if (n > SEGMENT_CELLS)
            n = SEGMENT_CELLS;
        memset(sieve, 1, (size_t)n);
        for (int64_t k = 0; k < n_primes; k++) {
            int64_t p = primes[k];
            int64_t j = next_cell[k];
            /* Consecutive odd multiples of p are 2 * p apart, i.e. p cells. */
            while (j < n) {
                sieve[j] = 0;
                j += p;
            }
            next_cell[k] = j - n;
        }
        for (int64_t i = 0; i < n; i++)
            count += sieve[i];
        done += n;
    }
    return count;
}

/* Number of primes p with start <= p < stop (0 for an empty range); -1 if malloc fails. */
long long count_primes(long long start, long long stop)
{
    if (stop <= start || stop <= 2)
        return 0;
    int64_t count = start <= 2 ? 1 : 0; /* 2 is the only even prime; the sieve is odd-only. */
    int64_t lo = (start > 3 ? start : 3) | 1;
    if (lo >= stop)
        return count;
    int64_t total = (stop - lo + 1) / 2;

    int64_t limit = isqrt64(stop - 1);
    int64_t odd_slots = limit / 2 + 1; /* bound on the number of odd primes <= limit */
    uint8_t *is_prime = malloc((size_t)(limit + 1));
    int64_t *primes = malloc((size_t)odd_slots * sizeof(int64_t));
    int64_t *next_cell = malloc((size_t)odd_slots * sizeof(int64_t));
    uint8_t *sieve = malloc(SEGMENT_CELLS);
    if (is_prime == NULL || primes == NULL || next_cell == NULL || sieve == NULL) {
        count = -1;
    } else {
        int64_t n_primes = odd_base_primes(limit, is_prime, primes);
        count += sieve_window(lo, total, primes, n_primes, next_cell, sieve);
    }
    free(is_prime);
    free(primes);
    free(next_cell);
    free(sieve);
    return count;
}
