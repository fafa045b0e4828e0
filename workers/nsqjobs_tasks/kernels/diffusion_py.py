"""Pure-Python reference for ``diffusion.run``: explicit 2-D diffusion on a periodic n x n grid.

Every implementation (this one, diffusion_numba, _diffusion_cy, bench/c/diffusion.c) performs the
same IEEE double operations in the same order, so their results are bit-identical: the stencil
adds the four neighbours left to right (up, down, left, right) before subtracting 4 * centre, and
each reduction runs in one accumulator in row-major order. Nothing may reassociate these sums
(no fastmath, no vectorised numpy reductions) nor fuse ``c + r * lap`` into one FMA.
"""

from nsqjobs_tasks.kernels.splitmix_py import mix, next_state

# 2**-53: the top 53 bits of a 64-bit output, scaled, are a double uniform in [0, 1).
UNIT = 1.0 / 9007199254740992.0
SHIFT = 11
# Weights of the checksum: idx % CHECKSUM_PERIOD + 1, so it also sees where the mass sits.
CHECKSUM_PERIOD = 7


def initial_field(n: int, seed: int) -> list[float]:
    """Return the n * n initial values, row-major, from the splitmix64 stream of ``seed``."""
    u = []
    state = seed
    for _ in range(n * n):
        state = next_state(state)
        u.append((mix(state) >> SHIFT) * UNIT)
    return u


def field_stats(u: list[float], n: int) -> tuple[float, float, float]:
    """Return (mean, max, checksum) of a row-major n * n field, each sum in one accumulator."""
    # Explicit loops: sum() of floats is compensated (Neumaier) from Python 3.12 on.
    total = 0.0
    peak = u[0]
    checksum = 0.0
    for idx in range(n * n):
        x = u[idx]
        total += x
        if x > peak:
            peak = x
        checksum += x * (idx % CHECKSUM_PERIOD + 1)
    return total / (n * n), peak, checksum


def step(u: list[float], v: list[float], n: int, r: float) -> None:
    """Write one explicit step of u into v: v = u + r * laplacian(u), periodic boundaries."""
    for i in range(n):
        up = (i - 1 if i > 0 else n - 1) * n
        mid = i * n
        down = (i + 1 if i < n - 1 else 0) * n
        for j in range(n):
            left = j - 1 if j > 0 else n - 1
            right = j + 1 if j < n - 1 else 0
            c = u[mid + j]
            lap = (((u[up + j] + u[down + j]) + u[mid + left]) + u[mid + right]) - 4.0 * c
            v[mid + j] = c + r * lap


def run(n: int, steps: int, d: float, dt: float, seed: int) -> tuple[float, float, float]:
    """Diffuse the splitmix64 field of ``seed`` on a periodic n x n grid for ``steps`` explicit
    steps of ``u += d * dt * laplacian(u)`` and return the (mean, max, checksum) of the result.

    The checksum is sum(u[idx] * (idx % 7 + 1)) over row-major indices. ``n`` must be at least 2
    (ValueError otherwise); the scheme is stable, and obeys the maximum principle, for
    d * dt <= 0.25, which the caller checks. ``seed`` is a uint64, in [0, 2**64).
    """
    if n < 2:
        raise ValueError(f"diffusion.run: n must be at least 2, got {n}")
    u = initial_field(n, seed)
    v = [0.0] * (n * n)
    r = d * dt
    for _ in range(steps):
        step(u, v, n, r)
        u, v = v, u
    return field_stats(u, n)
