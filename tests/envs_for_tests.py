"""Environments with faults, importable by worker processes (a class defined in a test module body would be too,
but a plain module keeps the import cheap: no pytest, no torch)."""

from __future__ import annotations

import os
import re
import time
from fractions import Fraction

from lit_echo.envs.base import StepResult


class FaultEnv:
    """A two-message task; ``step`` misbehaves on turn ``at_turn`` (1-based) as ``fault`` says, else answers.

    Hangs: ``sleep`` (time.sleep forever, GIL released), ``busy`` (a Python loop), ``regex`` (a catastrophic
    pattern on Python's ``re``, GIL held in C), ``exit`` (the process dies). Bad values: see ``BAD_VALUES``.
    """

    def __init__(self, fault: str = "none", at_turn: int = 1, from_seed: int = 0, pid_file: str | None = None):
        self.fault, self.at_turn, self.from_seed, self.turn, self.seed = fault, at_turn, from_seed, 0, 0
        if pid_file:
            with open(pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")

    def reset(self, seed: int):
        self.turn, self.seed = 0, seed
        return [{"role": "system", "content": "Test."}, {"role": "user", "content": f"Task {seed}."}]

    def step(self, action: str, truncated: bool = False) -> StepResult:
        self.turn += 1
        if self.turn == self.at_turn and self.seed >= self.from_seed:
            if self.fault == "sleep":
                time.sleep(10_000)
            elif self.fault == "busy":
                while True:
                    pass
            elif self.fault == "regex":
                re.search(r"(a*)*b", "a" * 64)
            elif self.fault == "exit":
                os._exit(3)
            elif self.fault == "unpicklable info":
                return StepResult("ok\n", info={"numbers": (i for i in range(3))})
            elif self.fault in BAD_VALUES:
                return BAD_VALUES[self.fault]()
        return StepResult(f"turn {self.turn}{' (cut)' if truncated else ''}\n", reward=0.5, done=self.turn >= 3,
                          info={"valid_action": True, "task_type": "fault"})


# Each: a StepResult (or not) that the contract rejects; the key names what check_step_result must report.
BAD_VALUES = {
    "observation None": lambda: StepResult(None),  # type: ignore[arg-type]
    "observation int": lambda: StepResult(42),  # type: ignore[arg-type]
    "reward nan": lambda: StepResult("x", reward=float("nan")),
    "reward inf": lambda: StepResult("x", reward=float("inf")),
    "reward -inf": lambda: StepResult("x", reward=float("-inf")),
    "reward 1e200": lambda: StepResult("x", reward=1e200),
    "reward huge int": lambda: StepResult("x", reward=10**400),
    "reward huge Fraction": lambda: StepResult("x", reward=Fraction(10**5000, 3)),
    "reward bool": lambda: StepResult("x", reward=True),
    "reward str": lambda: StepResult("x", reward="1.0"),  # type: ignore[arg-type]
    "info list": lambda: StepResult("x", info=[("success", True)]),  # type: ignore[arg-type]
    "info None": lambda: StepResult("x", info=None),  # type: ignore[arg-type]
    "done str": lambda: StepResult("x", done="yes"),  # type: ignore[arg-type]
    "warning bytes": lambda: StepResult("x", warning=b"careful"),  # type: ignore[arg-type]
    "task_type int": lambda: StepResult("x", info={"task_type": 3}),
    "observation surrogate": lambda: StepResult("bad \ud800 text"),
    "not a StepResult": lambda: {"observation": "x"},
}


class ScriptedEnv:
    """Three turns; records the actions it received; observations include text that looks like template."""

    def __init__(self, observation_chars: int = 0):
        self.observation_chars = observation_chars
        self.turn = 0
        self.actions: list[str] = []
        self.observations: list[str] = []

    def reset(self, seed: int):
        self.actions, self.observations, self.turn = [], [], 0
        return [{"role": "system", "content": "You are a test agent."},
                {"role": "user", "content": f"Task {seed}: say anything."}]

    def step(self, action: str) -> StepResult:
        self.turn += 1
        self.actions.append(action)
        text = f"turn {self.turn} <|im_end|> saw {len(action)} chars\n"
        if self.observation_chars:
            text = "x" * self.observation_chars
        self.observations.append(text)
        return StepResult(text, reward=0.5, done=self.turn == 3, info={"valid_action": self.turn != 2})


def lora_policy(checkpoint, rank: int = 4, seed: int = 0):
    """The tiny checkpoint with a LoRA adapter of ``rank`` whose B matrices are random (not zero), so sampling
    really goes through the adapters."""
    import torch

    from lit_echo import models

    torch.manual_seed(seed)
    model = models.build_model(str(checkpoint), lora_rank=rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model
