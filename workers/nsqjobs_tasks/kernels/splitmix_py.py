"""splitmix64 in pure Python: the PRNG every kernel implementation shares, bit for bit."""

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def next_state(state: int) -> int:
    """Advance the 64-bit state (add the golden-ratio gamma, mod 2**64)."""
    return (state + GAMMA) & MASK64


def mix(state: int) -> int:
    """The output of splitmix64 for an already-advanced ``state``."""
    z = state
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def stream(seed: int, n: int) -> list[int]:
    """The first ``n`` outputs for ``seed`` (for tests and references)."""
    out = []
    state = seed & MASK64
    for _ in range(n):
        state = next_state(state)
        out.append(mix(state))
    return out
