"""Entropy guard: scale the world term down while the policy's action entropy rises above where it started.

Pure Python. Why: in lit_echo's first ShellWorld grid (16 steps) the policy's action entropy rose in the order of
the world term's strength (world-model-only > ECHO 0.05 > decayed ECHO > PaW > masking); another team saw ECHO's
world term collapse a larger model at 0.05 and not at 0.005. A fixed coefficient cannot tell the two regimes
apart; the guard looks at the run itself.

The rule, per optimizer step ``s`` (entropies are the mean full-vocabulary entropy of the policy on the ACTION
tokens it trains on, ``policy/entropy``, measured before that step's update):

* reference ``H_ref``: the mean entropy of the first ``reference_steps`` steps that had action tokens;
* smoothed entropy ``H_s``: an exponential moving average of every step's entropy so far,
  ``H <- smoothing * H + (1 - smoothing) * h`` (the first value starts it);
* relative rise ``r = H / H_ref - 1``; factor ``g = clip(1 - (r - max_rise) / max_rise, 0, 1)``: the world term is
  untouched up to a rise of ``max_rise``, falls linearly to 0 at ``2 * max_rise``, and comes back the same way if
  the entropy falls again;
* step ``s`` trains with ``world_coef(s) * g``, where ``g`` comes from steps ``< s`` only (1 until the reference
  exists), so the factor is known before the step's first forward pass and is the same on every rank (the
  entropies are reduced over ranks before they reach the guard).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EntropyGuard:
    """See the module docstring.

    max_rise         relative rise of the smoothed action entropy over the reference at which the world term
                     starts to shrink (0.1: 10%); it is gone at twice that.
    reference_steps  steps whose mean entropy is the reference.
    smoothing        decay of the moving average (0: the last step alone).
    """

    max_rise: float
    reference_steps: int = 8
    smoothing: float = 0.95
    # State, saved in checkpoints (state_dict / load_state_dict).
    reference: float | None = field(default=None, init=False)
    smoothed: float | None = field(default=None, init=False)
    _reference_sum: float = field(default=0.0, init=False)
    _reference_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.max_rise > 0:
            raise ValueError(f"world_entropy_guard: expected a relative rise > 0 (e.g. 0.1 for 10%), got "
                             f"{self.max_rise}")
        if self.reference_steps < 1:
            raise ValueError(f"world_entropy_guard_steps: expected an integer >= 1, got {self.reference_steps}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"world_entropy_guard_smoothing: expected a number in [0, 1), got {self.smoothing}")

    @property
    def rise(self) -> float | None:
        """Relative rise of the smoothed entropy over the reference; None before the reference exists."""
        if self.reference is None or self.smoothed is None or self.reference <= 0:
            return None
        return self.smoothed / self.reference - 1.0

    def factor(self) -> float:
        """The multiplier of the next step's world coefficient, in [0, 1]."""
        rise = self.rise
        if rise is None:
            return 1.0
        return float(min(max(1.0 - (rise - self.max_rise) / self.max_rise, 0.0), 1.0))

    def update(self, entropy: float) -> None:
        """Record one step's mean action entropy (call after the step, with the value reduced over ranks)."""
        entropy = float(entropy)
        if entropy != entropy:  # NaN: a step to forget, not a reason to stop the world term for good
            return
        if self.reference is None:
            self._reference_sum += entropy
            self._reference_count += 1
            if self._reference_count >= self.reference_steps:
                self.reference = self._reference_sum / self._reference_count
        self.smoothed = entropy if self.smoothed is None else (
            self.smoothing * self.smoothed + (1.0 - self.smoothing) * entropy)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "smoothed": self.smoothed, "reference_sum": self._reference_sum,
                "reference_count": self._reference_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]
        self.smoothed = state["smoothed"]
        self._reference_sum = float(state["reference_sum"])
        self._reference_count = int(state["reference_count"])
