"""Human-readable numbers for plans, logs and reports."""

from __future__ import annotations


def human(n: float) -> str:
    """1.2e9 -> '1.20B', 48_460_000_000 -> '48.46B', 999 -> '999'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
