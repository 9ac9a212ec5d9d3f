"""What an online run's checkpoint carries so that a resumed run continues exactly where it stopped.

Lightning fetches one batch ahead: when a checkpoint is written after step s, the groups of step s+1 (and, with
``generate_every > 1``, the rest of their round) were already sampled by the weights before step s, and the
random stream has moved past them. A resume that sampled those groups again would use other weights and another
random state, so the resumed run would differ from an uninterrupted one from step s+1 on. The checkpoint
therefore keeps, besides the counters:

* the groups generated but not yet trained (``groups``: their index and rollouts), which the resumed run trains
  first, as they are, without sampling;
* the rounds whose metrics were not yet logged (``rounds``), so ``rollout/*`` is logged at the same steps;
* the random states (``rng``: Python, NumPy, torch CPU and CUDA) as they were at the save, set again just before
  the resumed run samples its first new group.

Each rank keeps its own (gathered into the checkpoint at the save). Validation rollouts are sampled on a random
stream of their own (:func:`separate_random_stream`), so validating, wherever it falls, does not move the
training stream. With the HF backend that makes a resumed run bit-identical to an uninterrupted one, on one
process or on several DDP ranks resumed on as many, with or without validation in between (tested). Not covered:
resuming on another number of ranks (each rank then samples its groups again) and the vLLM engine's own
sampling state.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lit_echo.rollout import Rollout


def rng_states() -> dict[str, Any]:
    """The random states sampling and dropout draw from: Python's, NumPy's (if installed), torch's CPU and CUDA."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, position, has_gauss, gauss = np.random.get_state()
        states["numpy"] = (name, keys.tolist(), position, has_gauss, gauss)  # plain values: loads weights_only
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Set what :func:`rng_states` returned (parts this process has no use for are skipped)."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

        name, keys, position, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def separate_random_stream(seed: int) -> Iterator[None]:
    """Run the block on a random stream of its own: Python's, NumPy's and torch's generators seeded with ``seed``
    inside, every state put back as it was afterwards. What the block draws (validation rollouts) then neither
    moves the training stream nor depends on where it stood."""
    saved = rng_states()
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in saved:
        import numpy as np

        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        set_rng_states(saved)


@dataclass
class Prefetched:
    """Groups ``first_group .. first_group + len(groups) - 1`` (each a list of rollouts), generated before the
    save and not trained; ``rounds``: the not yet logged rounds as ``(first_group, stats dict, samples,
    task_metrics)``; ``rng``: :func:`rng_states` at the save."""

    first_group: int
    groups: list[list[Rollout]]
    rounds: list[tuple[int, dict[str, float], list[Rollout], dict[str, float]]]
    rng: dict[str, Any]

    def to_state(self) -> dict[str, Any]:
        return {"first_group": self.first_group,
                "groups": [[r.to_dict() for r in group] for group in self.groups],
                "rounds": [(first, stats, [r.to_dict() for r in samples], metrics)
                           for first, stats, samples, metrics in self.rounds],
                "rng": self.rng}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Prefetched:
        return cls(first_group=int(state["first_group"]),
                   groups=[[Rollout.from_dict(r) for r in group] for group in state["groups"]],
                   rounds=[(int(first), dict(stats), [Rollout.from_dict(r) for r in samples], dict(metrics))
                           for first, stats, samples, metrics in state["rounds"]],
                   rng=state["rng"])

