"""Group-relative advantages (GRPO and Dr. GRPO), docs/method.md §4. Pure Python, no torch needed."""

from __future__ import annotations

import math
from collections.abc import Sequence


def grpo_advantages(rewards: Sequence[float], group_ids: Sequence[str], *, scale_by_std: bool = True,
                    eps: float = 1e-6) -> list[float]:
    """``A_i = (r_i - mean_g) / (std_g + eps)`` within each group g of rollouts of the same task.

    ``std_g`` is the sample standard deviation (Bessel-corrected, as verl and TRL compute it).
    ``scale_by_std=False`` gives Dr. GRPO (``A_i = r_i - mean_g``). A group of one rollout, or whose rewards are
    all equal, has zero advantage (its world-model term still trains).
    """
    if len(rewards) != len(group_ids):
        raise ValueError(f"rewards ({len(rewards)}) and group_ids ({len(group_ids)}) must have the same length")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        if len(idx) < 2:
            continue
        values = [float(rewards[i]) for i in idx]
        mean = sum(values) / len(values)
        if all(v == values[0] for v in values):
            continue
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for i, v in zip(idx, values):
            out[i] = (v - mean) / (std + eps) if scale_by_std else v - mean
    return out
