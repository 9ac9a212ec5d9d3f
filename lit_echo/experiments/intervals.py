"""95% intervals for success rates measured as several samples of each of several tasks (pure numpy).

Samples of one task are correlated (the same tree and question), so treating every episode as independent (a
binomial or Wilson interval over episodes) understates the uncertainty. :func:`task_bootstrap_interval`
resamples whole tasks instead; :func:`wilson_interval` is the episode-level interval, kept for a single sample
per task, where both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``(nan, nan)`` for zero trials)."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def task_bootstrap_interval(successes: Sequence[int], trials: Sequence[int], *, resamples: int = 2000,
                            seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled success rate ``sum(successes) / sum(trials)``, resampling tasks.

    ``successes[i]`` of ``trials[i]`` episodes of task i succeeded. With a single task the interval falls back to
    Wilson's over its episodes (there is nothing to resample).
    """
    k = np.asarray(successes, dtype=np.float64)  # [N]
    n = np.asarray(trials, dtype=np.float64)  # [N]
    if k.shape != n.shape or k.ndim != 1:
        raise ValueError(f"successes and trials must be 1-d and of equal length, got {k.shape} and {n.shape}")
    if n.sum() <= 0:
        return math.nan, math.nan
    if len(n) == 1:
        return wilson_interval(int(k[0]), int(n[0]))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(n), size=(resamples, len(n)))  # [R, N] task indices
    rates = k[picks].sum(1) / np.maximum(n[picks].sum(1), 1.0)  # [R]
    tail = (1 - level) / 2
    low, high = np.quantile(rates, [tail, 1 - tail])
    return float(low), float(high)


def paired_difference_interval(before: Sequence[float] | Sequence[Sequence[float]],
                               after: Sequence[float] | Sequence[Sequence[float]], *, resamples: int = 2000,
                               seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(difference, low, high)`` of the mean success of ``after`` minus that of ``before`` over the same tasks:
    a percentile bootstrap that resamples tasks, keeping each task's pair together, and, where a side holds
    several training runs, also resamples those runs (with replacement, independently per side).

    ``before[i]``, ``after[i]``: the success rate of task i at two evaluation points (same task seeds); or
    ``before[s][i]``: task i in run s (shape ``[runs, tasks]``, e.g. one row per training seed of an arm). Pairing
    removes the task-to-task spread that dominates each point's own interval, so it resolves much smaller
    changes than comparing the two intervals; resampling runs adds the spread between training seeds.
    """
    b = np.atleast_2d(np.asarray(before, dtype=np.float64))  # [Sb, N]
    a = np.atleast_2d(np.asarray(after, dtype=np.float64))  # [Sa, N]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"before and after must be [tasks] or [runs, tasks] over the same tasks, got shapes "
                         f"{b.shape} and {a.shape}")
    n = a.shape[1]
    if n == 0 or a.shape[0] == 0 or b.shape[0] == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    tasks = rng.integers(0, n, size=(resamples, n))  # [R, N], shared by both sides: the pairing

    def resampled_means(x: np.ndarray) -> np.ndarray:  # x: [S, N] -> [R]
        per_run = x[:, tasks].mean(-1)  # [S, R]
        if x.shape[0] > 1:
            runs = rng.integers(0, x.shape[0], size=(x.shape[0], resamples))  # [S, R]
            per_run = np.take_along_axis(per_run, runs, axis=0)
        return per_run.mean(0)

    diffs = resampled_means(a) - resampled_means(b)  # [R]
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return float(a.mean() - b.mean()), float(low), float(high)


def interval_of_mean(estimates: Sequence[float], lows: Sequence[float], highs: Sequence[float],
                     z: float = Z_95) -> tuple[float, float]:
    """Normal-approximation 95% interval of the mean of independent estimates, from their own 95% intervals.

    Each estimate's standard error is read off its interval as ``(high - low) / (2 z)``; the mean of n estimates
    has standard error ``sqrt(sum se_i^2) / n``. This is the evaluation noise of these runs, not the spread
    between training seeds (report that apart). Estimates without a finite interval are left out.
    """
    x = np.asarray(estimates, dtype=np.float64)  # [n]
    lo = np.asarray(lows, dtype=np.float64)  # [n]
    hi = np.asarray(highs, dtype=np.float64)  # [n]
    keep = np.isfinite(x) & np.isfinite(lo) & np.isfinite(hi)
    if not keep.any():
        return math.nan, math.nan
    se = (hi[keep] - lo[keep]) / (2 * z)
    mean = float(x[keep].mean())
    half = z * float(np.sqrt((se ** 2).sum())) / int(keep.sum())
    return mean - half, mean + half
