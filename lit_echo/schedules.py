"""``world_coef`` schedules: the world term's coefficient as a function of the optimizer step.

Pure Python. ECHO (arXiv 2605.24517) uses a constant ``world_coef`` of 0.05; its reference code also offers linear
and step decay. (PaW's per-group weights and transition selection live in :mod:`lit_echo.paw`.)
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear", "step")


def constant_coef(step: int, *, world_coef: float) -> float:
    """``world_coef`` at every step."""
    return float(world_coef)


def linear_decay_coef(step: int, *, world_coef: float, final_coef: float, decay_steps: int) -> float:
    """``world_coef + (final_coef - world_coef) * min(step / decay_steps, 1)``: linear, then flat at final_coef."""
    progress = min(max(step, 0) / max(decay_steps, 1), 1.0)
    return float(world_coef + (final_coef - world_coef) * progress)


def step_decay_coef(step: int, *, world_coef: float, gamma: float, step_size: int, final_coef: float = 0.0) -> float:
    """``max(world_coef * gamma ** (step // step_size), final_coef)``: multiply by gamma every step_size steps."""
    return float(max(world_coef * gamma ** (max(step, 0) // max(step_size, 1)), final_coef))


@dataclass
class WorldCoefSchedule:
    """world_coef as a function of the optimizer step.

    kind         "constant" | "linear" | "step".
    world_coef   the coefficient at step 0 (ECHO: 0.05; 0.01-0.05 productive, 0.2 collapses).
    final_coef   "linear": value reached at ``decay_steps``; "step": floor of the decay.
    decay_steps  "linear": steps to go from world_coef to final_coef.
    gamma        "step": factor applied every ``step_size`` steps.
    step_size    "step": steps between decays.

    EchoModule builds it from its flat options, e.g. in YAML::

        model:
          world_coef: 0.05
          world_schedule: linear      # kind
          world_final_coef: 0.0       # final_coef
          world_decay_steps: 500      # decay_steps
    """

    kind: str = "constant"
    world_coef: float = 0.05
    final_coef: float = 0.0
    decay_steps: int = 1000
    gamma: float = 0.5
    step_size: int = 100

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"WorldCoefSchedule.kind: expected one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        if not self.world_coef >= 0 or not self.final_coef >= 0:
            raise ValueError(f"world_coef and world_final_coef: expected numbers >= 0, got {self.world_coef} and "
                             f"{self.final_coef}")
        if not self.gamma > 0:
            raise ValueError(f"world_gamma: expected a factor > 0, got {self.gamma}")
        if self.decay_steps < 1 or self.step_size < 1:
            raise ValueError(f"WorldCoefSchedule: decay_steps and step_size must be >= 1, got {self.decay_steps} "
                             f"and {self.step_size}")

    @property
    def ever_positive(self) -> bool:
        """Whether the coefficient is above 0 at some step (a world term exists in this run)."""
        return self.world_coef > 0 or (self.kind != "constant" and self.final_coef > 0)

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return constant_coef(step, world_coef=self.world_coef)
        if self.kind == "linear":
            return linear_decay_coef(step, world_coef=self.world_coef, final_coef=self.final_coef,
                                     decay_steps=self.decay_steps)
        return step_decay_coef(step, world_coef=self.world_coef, gamma=self.gamma, step_size=self.step_size,
                               final_coef=self.final_coef)
