"""Small, dependency-free statistics for the experiments: Student-t intervals, paired differences, Best-of-N.

``mean_ci(xs)`` is the mean with the half-width of its two-sided t-interval (ddof 1); ``paired_diff(a, b)`` the
same for the per-seed differences ``a_i − b_i`` (the runs share seeds, so the seed-to-seed variation common to both
cancels), marked significant when the interval excludes 0. ``best_of_n(scores, true)`` is HaF-RM's Best-of-N
top-1 recall and the mean true-reward regret of the reward model's pick.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_ci(xs: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """``{mean, half, lo, hi, std, n}``: the mean and its two-sided ``level`` t-interval (std with ddof 1).

    NaNs are dropped; ``n < 2`` gives ``half = nan`` (no interval from one value), ``n = 0`` a NaN mean.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = [float(x) for x in xs if x == x]
    n = len(v)
    if n == 0:
        return dict(mean=math.nan, half=math.nan, lo=math.nan, hi=math.nan, std=math.nan, n=0)
    m = sum(v) / n
    if n < 2:
        return dict(mean=m, half=math.nan, lo=math.nan, hi=math.nan, std=math.nan, n=1)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return dict(mean=m, half=half, lo=m - half, hi=m + half, std=sd, n=n)


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of ``a_i − b_i`` over paired runs (same seeds) with its t-interval, and ``significant``.

    ``significant`` is True when the interval excludes 0 (a two-sided paired t-test at ``1 − level``); pairs with
    a NaN on either side are dropped. ``a`` and ``b`` must have the same length (one entry per seed).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_diff needs one value per seed on both sides, got len(a)={len(a)}, len(b)={len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b) if x == x and y == y]
    out: dict[str, Any] = dict(mean_ci(d, level))
    out["significant"] = bool(out["n"] >= 2 and (out["lo"] > 0 or out["hi"] < 0))
    return out


def best_of_n(
    scores: Sequence[Sequence[float]], true: Sequence[Sequence[float]], tol: float = 1e-9
) -> dict[str, float]:
    """Best-of-N top-1 recall and mean regret of picking, per prompt, the response the reward model scores highest.

    Args:
        scores: ``[P][N]`` reward-model scores of N candidate responses for each of P prompts.
        true: ``[P][N]`` their true rewards.
        tol: a pick counts as the true best when its true reward is within ``tol`` of the prompt's maximum (ties
            in the true reward are all "best").

    Returns ``{recall, regret, n_prompts}``: recall is the fraction of prompts whose pick (the first index of the
    maximum score) is a true best; regret the mean of ``max(true) − true[pick]`` (>= 0).
    """
    if len(scores) != len(true) or not scores:
        raise ValueError(f"scores and true must both be [P][N] with P >= 1, got P={len(scores)} and P={len(true)}")
    hits, regret = 0, 0.0
    for p, (s, t) in enumerate(zip(scores, true)):
        if len(s) != len(t) or len(s) < 2:
            raise ValueError(f"prompt {p}: scores and true need the same N >= 2, got {len(s)} and {len(t)}")
        pick = max(range(len(s)), key=lambda i: (s[i], -i))
        best = max(t)
        hits += best - t[pick] <= tol
        regret += best - t[pick]
    return dict(recall=hits / len(scores), regret=regret / len(scores), n_prompts=len(scores))
