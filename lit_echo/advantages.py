"""Group-relative advantages (GRPO and Dr. GRPO, docs/method.md §4) and group mean rewards.

Pure Python floats (float64), no torch needed. Any finite rewards work: each group is computed on its rewards
divided by a power of two near their largest magnitude (an exact scaling), so squares and sums cannot overflow,
and results are bit-identical to the plain formula wherever that one does not overflow.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence


def _groups(rewards: Sequence[float], group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Row indices of each group, after checking that every reward is a finite number."""
    if len(rewards) != len(group_ids):
        raise ValueError(f"rewards ({len(rewards)}) and group_ids ({len(group_ids)}) must have the same length")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    for g, idx in members.items():
        for i in idx:
            try:
                finite = math.isfinite(rewards[i])
            except (TypeError, OverflowError):
                finite = False
            if not finite:
                raise ValueError(f"group {g!r}: the reward of row {i} is {rewards[i]!r}, not a finite number; group "
                                 f"advantages and reward means need finite rewards (drop or fix that rollout)")
    return members


def grpo_advantages(rewards: Sequence[float], group_ids: Sequence[str], *, scale_by_std: bool = True,
                    eps: float = 1e-6) -> list[float]:
    """``A_i = (r_i - mean_g) / (std_g + eps)`` within each group g of rollouts of the same task.

    ``std_g`` is the sample standard deviation (Bessel-corrected, as verl and TRL compute it).
    ``scale_by_std=False`` gives Dr. GRPO (``A_i = r_i - mean_g``). A group of one rollout, or whose rewards are
    all equal, has zero advantage (its world-model term still trains). A non-finite reward raises a ValueError
    naming its group.
    """
    out = [0.0] * len(rewards)
    for idx in _groups(rewards, group_ids).values():
        values = [float(rewards[i]) for i in idx]
        if len(idx) < 2 or all(v == values[0] for v in values):
            continue
        exponent, unit = _scaled(values)
        mean = sum(unit) / len(unit)
        std = math.sqrt(sum((u - mean) ** 2 for u in unit) / (len(unit) - 1))
        for i, u in zip(idx, unit):
            if scale_by_std:  # (r - mean) / (std + eps), numerator and denominator scaled alike
                out[i] = (u - mean) / (std + math.ldexp(eps, -exponent))
            else:
                out[i] = math.ldexp(u - mean, exponent)  # |r - mean| <= 2 max |r|: finite below 8.9e307
    return out


def group_mean_rewards(rewards: Sequence[float], group_ids: Sequence[Hashable]) -> list[float]:
    """Each row's group mean reward ``mean_g`` (float64), the same groups as :func:`grpo_advantages`."""
    out = [0.0] * len(rewards)
    for idx in _groups(rewards, group_ids).values():
        exponent, unit = _scaled([float(rewards[i]) for i in idx])
        mean = math.ldexp(sum(unit) / len(unit), exponent)
        for i in idx:
            out[i] = mean
    return out


def _scaled(values: list[float]) -> tuple[int, list[float]]:
    """(e, values * 2**-e) with every scaled value in [-1, 1]; scaling by a power of two is exact."""
    exponent = math.frexp(max(abs(v) for v in values))[1]
    return exponent, [math.ldexp(v, -exponent) for v in values]
