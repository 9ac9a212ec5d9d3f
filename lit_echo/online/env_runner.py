"""Running environment steps safely: in worker threads, with a time limit, errors turned into values.

An online run must survive a broken or hanging environment: one bad step ends that rollout, never the run.
Python cannot kill a thread, so a step that overruns its time limit keeps running in a *daemon* thread (which
does not block interpreter exit) and its environment instance must be thrown away by the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lit_echo.envs.base import Environment, StepResult


@dataclass
class StepFailure:
    """A step that raised or overran its time limit; ``message`` is the harness text shown to the policy."""

    message: str
    timed_out: bool = False


def step_all(envs: Sequence[Environment], actions: Sequence[str], timeout_s: float | None
             ) -> list[StepResult | StepFailure]:
    """``env.step(action)`` for each pair, concurrently (one daemon thread each), within one shared deadline.

    Concurrency bounds the wall time of a turn by the slowest environment instead of the sum (environments
    that wait on a subprocess or I/O overlap; pure-Python ones are no slower than a loop).

    Returns one entry per env: its :class:`StepResult`, or a :class:`StepFailure` when ``step`` raised, returned
    something else, or did not finish within ``timeout_s`` seconds (None: no limit).
    """
    if len(envs) != len(actions):
        raise ValueError(f"step_all: {len(envs)} environments but {len(actions)} actions")
    results: list[StepResult | StepFailure | None] = [None] * len(envs)

    def run(i: int) -> None:
        try:
            result = envs[i].step(actions[i])
            if not isinstance(result, StepResult):
                raise TypeError(f"{type(envs[i]).__name__}.step returned {type(result).__name__}, "
                                "expected lit_echo.envs.base.StepResult")
            results[i] = result
        except Exception as err:  # any environment bug becomes a failed rollout, not a failed run
            results[i] = StepFailure(f"[environment error: {type(err).__name__}: {err}]")

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"env-step-{i}") for i in range(len(envs))]
    for thread in threads:
        thread.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out: list[StepResult | StepFailure] = []
    for i, thread in enumerate(threads):
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        # A new list: a straggler that finishes later writes only into ``results``, never into what we return.
        result = results[i]
        if thread.is_alive() or result is None:
            result = StepFailure(f"[environment error: step timed out after {timeout_s:g} s]", timed_out=True)
        out.append(result)
    return out
