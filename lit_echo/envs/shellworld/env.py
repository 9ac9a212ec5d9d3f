"""The ShellWorld environment: reset to a seeded tree and task, step on the assistant's ``<cmd>`` turns.

See the package docstring for the tool-call format and the split design.
"""

from __future__ import annotations

import random
import re
from typing import Any

from lit_echo.envs.base import StepResult
from lit_echo.envs.shellworld.filesystem import FileSystem
from lit_echo.envs.shellworld.generate import HELDOUT_STYLE, TRAIN_STYLE, World, generate_world
from lit_echo.envs.shellworld.shell import COMMANDS, Shell
from lit_echo.envs.shellworld.tasks import (HELDOUT_TASK_TYPES, TASK_BUILDERS, TRAIN_TASK_TYPES, Task,
                                            answer_matches)

SPLITS = {
    "train": (TRAIN_STYLE, TRAIN_TASK_TYPES),
    "heldout_trees": (HELDOUT_STYLE, TRAIN_TASK_TYPES),
    "heldout_tasks": (TRAIN_STYLE, HELDOUT_TASK_TYPES),
}

HOME = "/home/user"
NO_COMMAND_WARNING = ("WARNING: no command found. Reply with exactly one command inside <cmd></cmd>, "
                      "e.g. <cmd>ls</cmd>.\n")
MANY_COMMANDS_WARNING = ("WARNING: {n} commands found; nothing was run. Reply with exactly one command inside "
                         "<cmd></cmd> and chain commands with | inside it.\n")
EMPTY_ANSWER_WARNING = "WARNING: empty answer. Submit with <cmd>submit ANSWER</cmd>.\n"

_CMD = re.compile(r"<cmd>(.*?)</cmd>", re.DOTALL)

SYSTEM_PROMPT = f"""You are working in a Unix shell (bash) in the directory {HOME}. Answer the user's question \
by running commands.

Each reply runs exactly one command, written inside <cmd></cmd>; you may write one short sentence of reasoning \
before it. The command's output comes back as the next message. Available commands: \
{", ".join(sorted(COMMANDS))}; combine them with pipes (|). When you know the answer, reply \
<cmd>submit ANSWER</cmd> (one try; you have at most {{max_turns}} replies).

Example:
user: How many lines of notes.txt mention 'disk'?
assistant: Count the matching lines.
<cmd>grep -c disk notes.txt</cmd>
tool: 3
assistant: <cmd>submit 3</cmd>"""


class ShellWorld:
    """A simulated shell over a generated tree with one question per episode (reward 1.0 for a correct submit).

    ``split``: ``"train"``, ``"heldout_trees"`` or ``"heldout_tasks"`` (see the package docstring).
    ``max_turns``: assistant turns before the episode ends unanswered (reward 0).
    ``max_observation_chars``: longer output is cut there and a ``[output truncated: N more characters]`` line
    is appended (the notice is part of the observation).
    """

    def __init__(self, split: str = "train", max_turns: int = 8, max_observation_chars: int = 2000):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
        if max_turns < 1 or max_observation_chars < 1:
            raise ValueError("max_turns and max_observation_chars must be positive")
        self.split = split
        self.max_turns = max_turns
        self.max_observation_chars = max_observation_chars
        self.seed: int | None = None
        self.world: World | None = None
        self.task: Task | None = None
        self.shell: Shell | None = None
        self.turn = 0
        self.done = True

    def build(self, seed: int) -> tuple[World, Task]:
        """The tree and task of ``seed`` in this split, without starting an episode."""
        style, task_types = SPLITS[self.split]
        rng = random.Random(f"shellworld/{self.split}/{seed}")  # str seeds hash with SHA-512: stable everywhere
        world = generate_world(rng, style)
        task = TASK_BUILDERS[task_types[seed % len(task_types)]](rng, world)
        return world, task

    def reset(self, seed: int) -> list[dict[str, str]]:
        self.seed = seed
        self.world, self.task = self.build(seed)
        self.shell = Shell(FileSystem(self.world.tree, home=HOME))
        self.turn = 0
        self.done = False
        return [{"role": "system", "content": SYSTEM_PROMPT.format(max_turns=self.max_turns)},
                {"role": "user", "content": self.task.question}]

    def step(self, action: str) -> StepResult:
        if self.done or self.task is None or self.shell is None:
            raise RuntimeError("step() called on a finished episode; call reset(seed) first")
        self.turn += 1
        commands = [c.strip() for c in _CMD.findall(action)]
        if len(commands) != 1 or not commands[0]:
            warning = NO_COMMAND_WARNING if not any(commands) else MANY_COMMANDS_WARNING.format(n=len(commands))
            return self._result("", warning, valid=False)
        command = commands[0]
        if command == "submit" or command.startswith(("submit ", "submit\t", "submit\n")):
            answer = command[len("submit"):].strip()
            if not answer:
                return self._result("", EMPTY_ANSWER_WARNING, valid=False)
            success = answer_matches(answer, self.task.answer)
            self.done = True
            return self._result("Correct.\n" if success else "Incorrect.\n", None, valid=True, success=success)
        return self._result(self._truncate(self.shell.run(command)), None, valid=True)

    def _truncate(self, text: str) -> str:
        if len(text) <= self.max_observation_chars:
            return text
        kept = text[: self.max_observation_chars]
        notice = f"[output truncated: {len(text) - len(kept)} more characters]\n"
        return kept + ("" if kept.endswith("\n") else "\n") + notice

    def _result(self, observation: str, warning: str | None, *, valid: bool, success: bool = False) -> StepResult:
        if self.turn >= self.max_turns:
            self.done = True
        info: dict[str, Any] = {"success": success, "valid_action": valid, "task_type": self.task.type,
                                "turn": self.turn}
        return StepResult(observation, warning, reward=1.0 if success else 0.0, done=self.done, info=info)
