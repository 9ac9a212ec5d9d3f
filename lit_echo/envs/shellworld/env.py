"""The ShellWorld environment: reset to a seeded tree and task, step on the assistant's ``<cmd>`` turns.

See the package docstring for the tool-call format and the split design.
"""

from __future__ import annotations

import random
from typing import Any

from lit_echo.envs.actions import NO_ACTION_WARNING, extract_action
from lit_echo.envs.base import StepResult
from lit_echo.envs.shellworld.filesystem import FileSystem
from lit_echo.envs.shellworld.generate import HELDOUT_STYLE, TRAIN_STYLE, World, generate_world
from lit_echo.envs.shellworld.shell import COMMANDS, Shell
from lit_echo.envs.shellworld.tasks import HELDOUT_TASK_TYPES, TASK_BUILDERS, TRAIN_TASK_TYPES, Task, answer_matches

SPLITS = {
    "train": (TRAIN_STYLE, TRAIN_TASK_TYPES),
    "heldout_trees": (HELDOUT_STYLE, TRAIN_TASK_TYPES),
    "heldout_tasks": (TRAIN_STYLE, HELDOUT_TASK_TYPES),
}

HOME = "/home/user"
EXAMPLE_COMMAND = "ls"
NO_COMMAND_WARNING = NO_ACTION_WARNING.format(block="<cmd></cmd>", example=f"<cmd>{EXAMPLE_COMMAND}</cmd>")
EMPTY_ANSWER_WARNING = "WARNING: empty answer. Submit with <cmd>submit ANSWER</cmd>.\n"

SYSTEM_PROMPT = f"""You are working in a Unix shell (bash) in the directory {HOME}. Answer the user's question \
by running commands.

Each reply runs exactly one command, written inside <cmd></cmd>; you may write one short sentence of reasoning \
before it. The command's output comes back as the next message. Available commands: \
{", ".join(sorted(COMMANDS))}; combine them with pipes (|). When you know the answer, reply \
<cmd>submit ANSWER</cmd> (one try; replies are limited, so be quick).

Example:
user: How many lines of notes.txt mention 'disk'?
assistant: Count the matching lines.
<cmd>grep -c disk notes.txt</cmd>
tool: 3
assistant: <cmd>submit 3</cmd>"""


class ShellWorld:
    """A simulated shell over a generated tree with one question per episode (reward 1.0 for a correct submit).

    ``split``: ``"train"``, ``"heldout_trees"`` or ``"heldout_tasks"`` (see the package docstring).
    The episode ends at a submit; the turn limit and the observation length limit are the generator's
    (``max_turns``, ``max_observation_chars``).
    """

    def __init__(self, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
        self.split = split
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
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.task.question}]

    def step(self, action: str, truncated: bool = False) -> StepResult:
        """Run the turn's one ``<cmd>``; ``truncated``: the turn was cut at the token limit (a missing command
        then gets a warning that says so)."""
        if self.done or self.task is None or self.shell is None:
            raise RuntimeError("step() called on a finished episode; call reset(seed) first")
        self.turn += 1
        parsed = extract_action(action, "cmd", example=EXAMPLE_COMMAND, truncated=truncated)
        if parsed.action is None:
            return self._result("", parsed.warning, valid=False)
        command = parsed.action
        if command == "submit" or command.startswith(("submit ", "submit\t", "submit\n")):
            answer = command[len("submit"):].strip()
            if not answer:
                return self._result("", EMPTY_ANSWER_WARNING, valid=False)
            success = answer_matches(answer, self.task.answer)
            self.done = True
            return self._result("Correct.\n" if success else "Incorrect.\n", None, valid=True, success=success)
        return self._result(self.shell.run(command), None, valid=True)

    def _result(self, observation: str, warning: str | None, *, valid: bool, success: bool = False) -> StepResult:
        info: dict[str, Any] = {"success": success, "valid_action": valid, "task_type": self.task.type,
                                "turn": self.turn}
        return StepResult(observation, warning, reward=1.0 if success else 0.0, done=self.done, info=info)
