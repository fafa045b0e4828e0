"""Pure-Python reference for ``pi.estimate``: count splitmix64 points inside the quarter circle."""

from nsqjobs_tasks.kernels.splitmix_py import mix, next_state

# Each coordinate is the top 31 bits of a 64-bit output: an integer in [0, 2**31), so x*x + y*y
# is below 2**63 and the quarter-circle test is exact integer arithmetic, bit-identical everywhere.
SHIFT = 33
RADIUS_SQUARED = 1 << 62  # (2**31)**2


def count_inside(samples: int, seed: int) -> int:
    """Return how many of ``samples`` points (x, y) from the splitmix64 stream of ``seed``
    satisfy x*x + y*y < 2**62, i.e. fall inside the quarter circle; 0 when samples <= 0.

    Each point takes two consecutive outputs, x from the first and y from the second. The caller
    computes the estimate as 4 * inside / samples.
    """
    state = seed
    inside = 0
    for _ in range(samples):
        state = next_state(state)
        x = mix(state) >> SHIFT
        state = next_state(state)
        y = mix(state) >> SHIFT
        if x * x + y * y < RADIUS_SQUARED:
            inside += 1
    return inside
