"""The environment contract: what the online generator needs from a world the agent acts in, and what it promises.

Write your own environment as a class with two methods (and an optional third)::

    class MyEnv:
        def __init__(self, **env_kwargs): ...            # built by the generator from env_class + env_kwargs
        def reset(self, seed: int) -> list[dict]:
            # the opening messages, e.g. [{"role": "system", ...}, {"role": "user", "content": task}]
            ...
        def step(self, action: str, truncated: bool = False) -> StepResult:
            # ``action``: the assistant's whole turn as text. Parse it, act, and report what the world says.
            ...
        def close(self) -> None:                          # optional: release processes, files, games
            ...

The rules the generator follows, and the ones it expects the environment to follow:

* **Turns.** ``action`` is the text of the assistant's turn, end-of-turn token excluded. The environment parses
  it itself (:mod:`lit_echo.envs.actions` extracts ``<cmd>...</cmd>`` or a regex match with a standard warning)
  and returns a harness warning in :attr:`StepResult.warning` for a malformed turn. The warning is trained as
  ``Role.WARNING``, the observation body as ``Role.OBSERVATION``.
* **Cut turns.** A turn that hit ``max_new_tokens`` before the end-of-turn token was sampled is passed as
  ``step(action, truncated=True)`` when ``step`` accepts a ``truncated`` keyword (checked once per class), else
  as ``step(action)``.
* **info.** The generator reads three keys of :attr:`StepResult.info`: ``success`` (bool: counts the rollout as
  solved; the last value seen wins), ``valid_action`` (bool: ``False`` counts an invalid action) and
  ``task_type`` (str, at most 200 characters: stored in the rollout's metadata and used for per-task-type
  metrics). Every other key is the environment's own.
* **Seeding.** A group's G instances are each reset with the *same* seed and must then pose the same task
  (the group's rewards are compared with each other for the GRPO advantage); the sampled actions differ. Make
  the task a function of the seed alone, never of a random state shared between instances.
* **Reuse.** The generator keeps its G instances and resets them for every group: ``reset`` must start a
  fresh episode however the last one ended (done, cut at ``max_turns``, or abandoned by an error).
* **Limits live in the generator.** ``max_turns`` ends a rollout after that many assistant turns and
  ``max_observation_chars`` cuts long observations with :func:`truncate_observation`'s notice; both are
  settings of :class:`~lit_echo.online.generator.SamplingSettings` (and of the online data module), never of
  the environment. An environment that ends an episode itself says so with ``done=True``.
* **Returns are checked.** ``step`` must return a :class:`StepResult` with ``observation`` a ``str``,
  ``warning`` a ``str`` or None, ``reward`` a real number (``int``/``float``, numpy scalars included; not a
  ``bool``) that is finite and within float32 range, ``done`` a bool (or 0/1), ``info`` a ``dict``, and text
  that is valid Unicode (no lone surrogates). Anything else, an exception, or a step over
  ``env_step_timeout_s`` ends that rollout only (reward 0, the error text as its last message, a WARNING in the
  log). ``reset`` errors stop the run: a task that cannot start is a configuration problem.
* **Threads or processes.** With ``env_isolation="thread"`` (the default) each ``step`` of a group runs in its
  own worker thread, concurrently with the other instances' steps; instances are never shared between threads
  at the same time. Python cannot stop a thread: a step over the time limit keeps running in the background
  (holding the CPU, and the GIL if it is in C code such as a regular expression) and its instance is retired.
  With ``env_isolation="process"`` each instance lives in its own worker process, built there from an
  importable class and keyword arguments (:class:`EnvSpec`); a step over the limit gets the process killed
  and replaced. Use processes for environments you do not fully trust, or that can hang.
* **close.** ``close()``, when defined, is called once on each instance the generator retires and on every
  instance at teardown (:meth:`GroupGenerator.close`). In thread mode an instance retired after a timeout is
  closed only when its hung step has returned (by the thread that ran it), never while that step runs; one whose
  step never returns is never closed. The exception: a teardown while a step is under way (Ctrl-C, an error
  ending the fit in the middle of a turn) closes every instance in service, the stepping ones included, from
  the trainer's thread; so ``close`` should still be safe to call from another thread. Errors in ``close``
  are logged, never raised.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class StepResult:
    """What one environment step returns.

    ``observation``: the text the environment produced (the body of the next ``tool`` message; may be empty).
    ``warning``: harness-written format warning prefixed to the observation, or None.
    ``reward``: reward of this step (the rollout's reward is the sum over steps).
    ``done``: the episode is over; no further assistant turn is sampled.
    ``info``: free-form diagnostics; the generator reads ``success``, ``valid_action`` and ``task_type``.
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
        """Apply the assistant's turn ``action`` (its text, end-of-turn token excluded); may also accept
        ``truncated: bool`` (the turn was cut at ``max_new_tokens``)."""


def truncate_observation(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters plus a notice line saying how much was cut (part of the text).

    The one place observations are cut: the generator applies it to every step's observation (and warning), the
    ShellWorld expert to its offline records.
    """
    if len(text) <= max_chars:
        return text
    kept = text[:max_chars]
    separator = "" if kept.endswith("\n") else "\n"
    return f"{kept}{separator}[observation truncated: {len(text) - max_chars} more characters]\n"


def import_object(path: str, option: str = "env_class") -> Any:
    """The object named by a dotted import path such as ``"lit_echo.envs.shellworld.ShellWorld"``; errors name
    ``option``, the configuration entry the path came from."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{option}: expected a dotted import path like 'package.module.Name', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"{option} {path!r}: cannot import module {module_name!r} ({err})") from err
    if not hasattr(module, name):
        raise ImportError(f"{option} {path!r}: module {module_name!r} has no attribute {name!r}")
    return getattr(module, name)


def import_env_class(path: str) -> type:
    """The environment class named by a dotted import path."""
    return import_object(path, "env_class")


@dataclass(frozen=True)
class EnvSpec:
    """An environment factory that can cross a process boundary: an import path and constructor kwargs.

    ``EnvSpec("lit_echo.envs.shellworld.ShellWorld", {"split": "train"})()`` builds one instance. Pass it as the
    generator's ``env_factory`` (required for ``env_isolation="process"``, where each worker process builds its
    own instance; closures cannot be sent to another process).
    """

    class_path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # in group ids, metrics and error messages; default: the class name
    option: str = "env_class"  # the configuration entry an import error names

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.class_path.rpartition(".")[2])

    def __call__(self) -> Environment:
        return import_object(self.class_path, self.option)(**self.kwargs)
