"""The environment protocol: what the online generator needs from a world the agent acts in.

Wrap your own environment in a class with these two methods::

    class MyEnv:
        def reset(self, seed: int) -> list[dict]:
            # the opening messages, e.g. [{"role": "system", ...}, {"role": "user", "content": task}]
            ...
        def step(self, action: str) -> StepResult:
            # ``action``: the assistant's whole turn as text. Parse it, act, and report what the world says.
            ...

The environment parses the assistant's turn itself (each environment documents its tool-call format) and
returns a harness warning in ``StepResult.warning`` when the turn is malformed; the warning is trained as
``Role.WARNING`` and the observation body as ``Role.OBSERVATION``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class StepResult:
    """What one environment step returns.

    ``observation``: the text the environment produced (the body of the next ``tool`` message; may be empty).
    ``warning``: harness-written format warning prefixed to the observation, or None.
    ``reward``: reward of this step (the rollout's reward is the sum over steps).
    ``done``: the episode is over; no further assistant turn is sampled.
    ``info``: free-form diagnostics (e.g. ``{"valid_action": False}``, ``{"success": True}``).
    """

    observation: str
    warning: str | None = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    def reset(self, seed: int) -> list[dict[str, str]]:
        """Start the episode for ``seed`` and return its opening messages (system prompt and task)."""

    def step(self, action: str) -> StepResult:
        """Apply the assistant's turn ``action`` (its text, end-of-turn token excluded)."""
