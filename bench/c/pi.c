/*
 * pi.estimate in plain C99: the speed limit for the benchmarks, not used by the service.
 *
 * The same algorithm as workers/kernels/pi_py.py (and pi_numba, _pi_cy), bit for bit: each
 * point takes two consecutive splitmix64 outputs, keeps their top 31 bits as x and y, and counts
 * it when x*x + y*y < 2**62. Build: gcc -O2 -shared -fPIC -o pi.so pi.c; call via ctypes.
 */
#include <stdint.h>

static inline uint64_t next_state(uint64_t state)
{
    return state + UINT64_C(0x9E3779B97F4A7C15);
}

static inline uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

long long count_inside(unsigned long long samples, unsigned long long seed)
{
    uint64_t state = seed;
    long long inside = 0;
    for (uint64_t i = 0; i < samples; i++) {
        state = next_state(state);
        uint64_t x = mix(state) >> 33;
        state = next_state(state);
        uint64_t y = mix(state) >> 33;
        /* 31-bit coordinates: the sum is below 2**63, so it cannot wrap. */
        if (x * x + y * y < (UINT64_C(1) << 62))
            inside++;
    }
    return inside;
}
