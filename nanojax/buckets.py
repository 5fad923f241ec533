"""The few static lengths that jitted code is compiled for: a batch is padded up to its bucket, so XLA builds
one program per bucket instead of one per length."""


def bucket(n: int, minimum: int = 16, cap: int | None = None, half_steps: bool = False) -> int:
    """Smallest power of two >= n (at least `minimum`), or with `half_steps` also 1.5x powers of two
    (64, 96, 128, 192, ...), capped at `cap`."""
    b = max(minimum, 1 << max(0, (n - 1)).bit_length())
    if half_steps and b >= 4 and max(n, minimum) <= 3 * b // 4:
        b = 3 * b // 4
    return min(b, cap) if cap is not None else b
