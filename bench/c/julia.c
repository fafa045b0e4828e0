/*
 * julia.tile in plain C99: the speed limit for the Numba and Cython kernels (bench only).
 *
 * The same algorithm, in the same floating-point order, as workers/kernels/julia_py.py. Built
 * with `gcc -O2 -shared -fPIC` (no -march, no -ffast-math) and called through ctypes. x86-64
 * without -march has no fused multiply-add, so the counts are bit-identical to julia_py's. On a
 * target that has one (aarch64, or -march=native on a recent x86), GCC's default
 * -ffp-contract=fast would fuse (2.0 * zr) * zi + c_im; add -ffp-contract=off there. Clang
 * honours the C99 pragma below instead (GCC ignores it, with a warning under -Wall).
 */
#include <stddef.h>

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

void escape_counts(int width, int height, double x_min, double x_max, double y_min,
                   double y_max, double c_re, double c_im, int max_iter, unsigned short *out)
{
    const double dx = x_max - x_min;
    const double dy = y_max - y_min;
    for (int j = 0; j < height; j++) {
        const double y = y_min + ((double)j * dy) / (double)(height - 1);
        unsigned short *row = out + (size_t)j * (size_t)width;
        for (int i = 0; i < width; i++) {
            const double x = x_min + ((double)i * dx) / (double)(width - 1);
            double zr = x;
            double zi = y;
            int n = 0;
            while (n < max_iter) {
                const double zr2 = zr * zr;
                const double zi2 = zi * zi;
                if (zr2 + zi2 > 4.0)
                    break;
                zi = (2.0 * zr) * zi + c_im;
                zr = (zr2 - zi2) + c_re;
                n++;
            }
            row[i] = (unsigned short)n;
        }
    }
}
