"""Confidence intervals over independent replicates (seeds, or (alpha, seed) runs).

`interval(values)`: the mean and its two-sided 95% Student-t interval mean ± t_{0.975, n−1}·s/√n,
with s the sample standard deviation. With one replicate there is no interval (lo = hi = None).
"""
from __future__ import annotations

import math

# Two-sided 95% quantiles t_{0.975, df} for df = 1..30; beyond, 1.96 + 2.4/df is within 0.004.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("df must be >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def interval(values) -> dict:
    """{"mean", "lo", "hi", "n", "sd"} of the finite values (lo/hi None when n < 2)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def exp_interval(log_interval: dict) -> dict:
    """An interval of logs mapped back (a geometric mean and its interval)."""
    f = lambda v: None if v is None else math.exp(v)
    return {**log_interval, "mean": f(log_interval["mean"]), "lo": f(log_interval["lo"]),
            "hi": f(log_interval["hi"]), "sd": None}


def excludes(iv: dict, value: float, side: str) -> bool | None:
    """Whether the interval lies entirely above (side="above") or below `value`; None without one."""
    if iv["lo"] is None:
        return None
    return iv["lo"] > value if side == "above" else iv["hi"] < value


def fmt(iv: dict, digits: int = 3) -> str:
    """'m [lo, hi]' or 'm (n=1, no interval)'."""
    if iv["mean"] is None:
        return "n/a"
    g = lambda v: f"{v:.{digits}g}"
    if iv["lo"] is None:
        return f"{g(iv['mean'])} (n={iv['n']}, no interval)"
    return f"{g(iv['mean'])} [{g(iv['lo'])}, {g(iv['hi'])}]"
