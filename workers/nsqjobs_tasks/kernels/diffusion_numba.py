"""Numba ``diffusion.run`` kernel: the periodic 5-point diffusion of diffusion_py, GIL-free.

Bit-identical to diffusion_py: no fastmath, so LLVM neither reassociates the sums nor contracts
``c + r * lap`` into an FMA (even on a CPU that has one); the stencil is elementwise, so
vectorising it changes nothing, and the reductions stay sequential.
"""

import numba
import numpy as np
import numpy.typing as npt

from nsqjobs_tasks.kernels.splitmix_numba import mix, next_state

# Same constants as diffusion_py. The shift is a uint64: an int64 operand would promote to float.
UNIT = 1.0 / 9007199254740992.0
SHIFT = np.uint64(11)
CHECKSUM_PERIOD = 7


@numba.njit(nogil=True, cache=True)
def _step_row(
    up: npt.NDArray[np.float64],
    mid: npt.NDArray[np.float64],
    down: npt.NDArray[np.float64],
    out: npt.NDArray[np.float64],
    r: float,
) -> None:
    # The wrapped columns 0 and n - 1 are peeled so the interior loop has no branch (n >= 2).
    n = mid.shape[0]
    c = mid[0]
    out[0] = c + r * ((((up[0] + down[0]) + mid[n - 1]) + mid[1]) - 4.0 * c)
    for j in range(1, n - 1):
        c = mid[j]
        out[j] = c + r * ((((up[j] + down[j]) + mid[j - 1]) + mid[j + 1]) - 4.0 * c)
    c = mid[n - 1]
    out[n - 1] = c + r * ((((up[n - 1] + down[n - 1]) + mid[n - 2]) + mid[0]) - 4.0 * c)


@numba.njit(nogil=True, cache=True)
def _run(
    n: np.int64, steps: np.int64, d: np.float64, dt: np.float64, seed: np.uint64
) -> tuple[float, float, float]:
    u = np.empty((n, n), dtype=np.float64)
    v = np.empty((n, n), dtype=np.float64)
    state = seed
    for i in range(n):
        for j in range(n):
            state = next_state(state)
            u[i, j] = (mix(state) >> SHIFT) * UNIT

    r = d * dt
    for _ in range(steps):
        for i in range(n):
            im = i - 1 if i > 0 else n - 1
            ip = i + 1 if i < n - 1 else 0
            _step_row(u[im], u[i], u[ip], v[i], r)
        u, v = v, u

    total = 0.0
    peak = u[0, 0]
    checksum = 0.0
    idx = 0
    for i in range(n):
        for j in range(n):
            x = u[i, j]
            total += x
            if x > peak:
                peak = x
            checksum += x * (idx % CHECKSUM_PERIOD + 1)
            idx += 1
    return total / (n * n), peak, checksum


def run(n: int, steps: int, d: float, dt: float, seed: int) -> tuple[float, float, float]:
    """Diffuse the splitmix64 field of ``seed`` on a periodic n x n grid for ``steps`` explicit
    steps of ``u += d * dt * laplacian(u)`` and return the (mean, max, checksum) of the result.

    Same contract as diffusion_py.run: ``n`` >= 2 (ValueError otherwise), d * dt <= 0.25 checked
    by the caller, ``seed`` in [0, 2**64) (OverflowError otherwise).
    """
    if n < 2:
        raise ValueError(f"diffusion.run: n must be at least 2, got {n}")
    # Fixed argument types: one compiled specialisation, whatever int/float the caller passes.
    mean, peak, checksum = _run(
        np.int64(n), np.int64(steps), np.float64(d), np.float64(dt), np.uint64(seed)
    )
    return float(mean), float(peak), float(checksum)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the kernel now rather than on the first job."""
    run(2, 1, 1.0, 0.1, 0)
