/* diffusion.run in plain C99, for benchmarks only: the speed limit for the Python kernels.
 *
 * Same algorithm, and the same IEEE double operations in the same order, as
 * workers/kernels/diffusion_py.py, so the result is bit-identical to the three Python kernels
 * provided the compiler neither reassociates (no -ffast-math) nor contracts c + r * lap into an
 * FMA. gcc defaults to -ffp-contract=fast in GNU mode, but without -march baseline x86-64 has no
 * FMA instruction to contract into; on a target with FMA (e.g. aarch64) add -ffp-contract=off.
 *
 * Build: gcc -O2 -shared -fPIC -o diffusion.so diffusion.c
 * Call:  diffusion_run(n, steps, d, dt, seed, out3), e.g. through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define SHIFT 11
#define CHECKSUM_PERIOD 7

static inline uint64_t next_state(uint64_t state) {
    return state + UINT64_C(0x9E3779B97F4A7C15);
}

static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* One row of v = u + r * laplacian(u); columns 0 and n - 1 wrap (n >= 2). */
static inline void step_row(const double *up, const double *mid, const double *down,
                            double *out, size_t n, double r) {
    double c = mid[0];
    out[0] = c + r * ((((up[0] + down[0]) + mid[n - 1]) + mid[1]) - 4.0 * c);
    for (size_t j = 1; j < n - 1; j++) {
        c = mid[j];
        out[j] = c + r * ((((up[j] + down[j]) + mid[j - 1]) + mid[j + 1]) - 4.0 * c);
    }
    c = mid[n - 1];
    out[n - 1] = c + r * ((((up[n - 1] + down[n - 1]) + mid[n - 2]) + mid[0]) - 4.0 * c);
}

/* Writes (mean, max, checksum) into out3; all three are NaN when n < 2 or allocation fails. */
void diffusion_run(int n, int steps, double d, double dt, unsigned long long seed,
                   double *out3) {
    out3[0] = out3[1] = out3[2] = NAN;
    if (n < 2) {
        return;
    }
    size_t size = (size_t)n * (size_t)n;
    double *u = malloc(size * sizeof(double));
    double *v = malloc(size * sizeof(double));
    if (u == NULL || v == NULL) {
        free(u);
        free(v);
        return;
    }

    uint64_t state = seed;
    for (size_t idx = 0; idx < size; idx++) {
        state = next_state(state);
        u[idx] = (double)(mix(state) >> SHIFT) * (1.0 / 9007199254740992.0); /* 2**-53 */
    }

    double r = d * dt;
    for (int s = 0; s < steps; s++) {
        for (size_t i = 0; i < (size_t)n; i++) {
            size_t im = i > 0 ? i - 1 : (size_t)n - 1;
            size_t ip = i < (size_t)n - 1 ? i + 1 : 0;
            step_row(u + im * n, u + i * n, u + ip * n, v + i * n, (size_t)n, r);
        }
        double *tmp = u;
        u = v;
        v = tmp;
    }

    double total = 0.0, peak = u[0], checksum = 0.0;
    for (size_t idx = 0; idx < size; idx++) {
        double x = u[idx];
        total += x;
        if (x > peak) {
            peak = x;
        }
        checksum += x * (double)(idx % CHECKSUM_PERIOD + 1);
    }
    out3[0] = total / (double)size;
    out3[1] = peak;
    out3[2] = checksum;
    free(u);
    free(v);
}
