"""Environments for the lifetime tests (``test_env_lifetimes.py``), importable by worker processes: a plain
module, so a worker imports no pytest and no torch."""

from __future__ import annotations

import time

from lit_echo.envs.base import StepResult


class SlowReset:
    """``reset`` sleeps ``reset_s`` seconds (GIL released) before returning the opening; ``step`` ends the task."""

    def __init__(self, reset_s: float = 0.0):
        self.reset_s = reset_s

    def reset(self, seed: int):
        time.sleep(self.reset_s)
        return [{"role": "system", "content": "Test."}, {"role": "user", "content": f"Task {seed}."}]

    def step(self, action: str) -> StepResult:
        return StepResult("ok\n", reward=1.0, done=True)


class Tracked(SlowReset):
    """Keeps every instance built in this process in ``Tracked.instances``; ``closed`` counts its ``close()``
    calls (thread mode: the test sees whether each instance was closed, not just dropped)."""

    instances: list[Tracked] = []

    def __init__(self, reset_s: float = 0.0):
        super().__init__(reset_s)
        self.closed = 0
        Tracked.instances.append(self)

    def close(self) -> None:
        self.closed += 1
