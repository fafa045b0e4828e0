"""The built-in tasks. Importing this module registers them (the debug tasks are in
``nsqjobs_tasks.debug``, loaded when ``NSQJOBS_DEBUG_TASKS=1``)."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt
from nsqjobs import task

from nsqjobs_tasks import impl

MAX_PRIME_BOUND = 10**12
MAX_PRIME_SPAN = 10**9
MAX_SEED = 2**64 - 1
# msgspec checks bounds only within int64, so the top of the seed range is checked by hand.
Seed = Annotated[
    int, msgspec.Meta(ge=0, extra_json_schema={"maximum": MAX_SEED}, description="0 to 2**64 - 1")
]


def _check_seed(seed: int) -> None:
    if seed > MAX_SEED:
        raise ValueError(f"seed must be <= 2**64 - 1, got {seed}")


class PrimesCountArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Count primes p with start <= p < stop (rules: start <= stop, stop - start <= 10**9)."""

    start: Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIME_BOUND)]
    stop: Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIME_BOUND)]

    def __post_init__(self) -> None:
        if self.start > self.stop:
            raise ValueError(f"start ({self.start}) must be <= stop ({self.stop})")
        if self.stop - self.start > MAX_PRIME_SPAN:
            raise ValueError(f"stop - start must be <= {MAX_PRIME_SPAN}")


@task("primes.count", time_limit_s=600, warm_up=lambda: impl.warm_up("primes"))
def primes_count(args: PrimesCountArgs) -> int:
    """Number of primes in [start, stop), by a segmented sieve (Numba, Cython or Python)."""
    count: int = impl.function("primes", "count_primes")(args.start, args.stop)
    return count


class PiEstimateArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Monte Carlo samples and the splitmix64 seed (same seed, same answer, every kernel)."""

    samples: Annotated[int, msgspec.Meta(ge=1, le=10**10)]
    seed: Seed

    def __post_init__(self) -> None:
        _check_seed(self.seed)


@task("pi.estimate", time_limit_s=3600, warm_up=lambda: impl.warm_up("pi"))
def pi_estimate(args: PiEstimateArgs) -> dict[str, Any]:
    """Estimate pi from the share of random points inside the quarter circle."""
    inside: int = impl.function("pi", "count_inside")(args.samples, args.seed)
    return {"estimate": 4.0 * inside / args.samples, "inside": inside, "samples": args.samples}


MAX_JULIA_PIXELS = 4_000_000
MAX_JULIA_COUNTS_PIXELS = 100_000  # 200 KB of counts: a result still fits an NSQ message
Finite = Annotated[float, msgspec.Meta(ge=-1e6, le=1e6)]


class JuliaTileArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A grid over the complex plane and the Julia parameter c (rules: width x height <=
    4,000,000, x_min < x_max, y_min < y_max)."""

    width: Annotated[int, msgspec.Meta(ge=2, le=MAX_JULIA_PIXELS // 2)]
    height: Annotated[int, msgspec.Meta(ge=2, le=MAX_JULIA_PIXELS // 2)]
    x_min: Finite
    x_max: Finite
    y_min: Finite
    y_max: Finite
    c_re: Finite
    c_im: Finite
    max_iter: Annotated[int, msgspec.Meta(ge=1, le=10_000)]

    def __post_init__(self) -> None:
        if self.width * self.height > MAX_JULIA_PIXELS:
            raise ValueError(f"width x height must be <= {MAX_JULIA_PIXELS:,}")
        if not (self.x_min < self.x_max and self.y_min < self.y_max):
            raise ValueError("x_min must be < x_max and y_min < y_max")


@task("julia.tile", time_limit_s=3600, warm_up=lambda: impl.warm_up("julia"))
def julia_tile(args: JuliaTileArgs) -> dict[str, Any]:
    """Escape-time counts of the Julia set z <- z*z + c on a grid: totals and a histogram."""
    counts: npt.NDArray[np.uint16] = impl.function("julia", "escape_counts")(
        args.width,
        args.height,
        args.x_min,
        args.x_max,
        args.y_min,
        args.y_max,
        args.c_re,
        args.c_im,
        args.max_iter,
    )
    # Decile k holds counts in [k, k+1) * max_iter / 10; the last one includes max_iter.
    bins = np.minimum(counts.astype(np.int64) * 10 // args.max_iter, 9)
    result: dict[str, Any] = {
        "total_iterations": int(counts.sum(dtype=np.int64)),
        "histogram": np.bincount(bins, minlength=10).tolist(),
    }
    if args.width * args.height <= MAX_JULIA_COUNTS_PIXELS:
        result["counts"] = base64.b64encode(counts.astype("<u2").tobytes()).decode()
    return result


class DiffusionRunArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grid size, steps, diffusivity and time step, seed (rule: d * dt <= 0.25, the stability
    limit)."""

    n: Annotated[int, msgspec.Meta(ge=2, le=4096)]
    steps: Annotated[int, msgspec.Meta(ge=0, le=10_000)]
    d: Annotated[float, msgspec.Meta(gt=0, le=1e6)]
    dt: Annotated[float, msgspec.Meta(gt=0, le=1e6)]
    seed: Seed

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        if self.d * self.dt > 0.25:
            raise ValueError(
                f"d * dt = {self.d * self.dt:g} must be <= 0.25 (the explicit scheme is unstable)"
            )


@task("diffusion.run", time_limit_s=3600, warm_up=lambda: impl.warm_up("diffusion"))
def diffusion_run(args: DiffusionRunArgs) -> dict[str, float]:
    """Explicit 2-D diffusion on a periodic n x n grid from a seeded random field."""
    mean, top, checksum = impl.function("diffusion", "run")(
        args.n, args.steps, args.d, args.dt, args.seed
    )
    return {"mean": mean, "max": top, "checksum": checksum}


@task("noop", time_limit_s=10)
def noop(args: dict[str, Any]) -> dict[str, Any]:
    """Return the arguments unchanged (for measuring the pipeline itself)."""
    return args
