"""ShellWorld: a deterministic, simulated Unix shell over a generated file tree, with checkable questions.

Pure Python: no process is spawned and no real file is touched. Each seed gives a tree (service logs, an access
log, CSV exports, INI configs, a README, nested archive directories) and one question about it.

Tool-call format
----------------
The assistant replies with exactly one command inside ``<cmd>...</cmd>``; free text around it (reasoning) is
allowed::

    The error count is what grep -c prints.
    <cmd>grep -c ERROR logs/api.log</cmd>

The observation (the next ``tool`` message) is the command's terminal text: stderr, then stdout, exactly as
printed (usually ending in a newline; empty output gives an empty observation); the generator cuts long ones at
its ``max_observation_chars`` with a ``[observation truncated: N more characters]`` line. To answer, reply
``<cmd>submit ANSWER</cmd>``: the episode ends with reward 1.0 if the answer is right (observation
``Correct.``), else 0.0 (``Incorrect.``). Answers are compared after normalizing whitespace, case, surrounding
quotes and a final period; numbers by value.

Malformed turns run nothing and return an empty observation with a ``StepResult.warning``
(``info["valid_action"] = False``, the standard texts of :mod:`lit_echo.envs.actions`); they still use up a turn:

* no ``<cmd>`` (or an empty one): ``WARNING: no command found. Reply with exactly one command inside <cmd></cmd>,
  e.g. <cmd>ls</cmd>.`` (``WARNING: reply cut off at the token limit ...`` when the generator flags the turn as
  cut at ``max_new_tokens``);
* several ``<cmd>`` blocks: rejected as a whole (``WARNING: 2 commands found; nothing was run. ...``), so the model
  learns that one turn is one command;
* ``<cmd>submit</cmd>`` with no answer: ``WARNING: empty answer. ...``.

The episode has no turn limit of its own: the generator's ``max_turns`` ends it (reward 0 without a submit).
``info`` holds ``success``, ``valid_action``, ``task_type`` and ``turn``.

Shell
-----
``ls cd pwd cat head tail grep wc find sort uniq cut echo`` with pipes, quotes, globs and ``~``; output mimics GNU
coreutils under ``LC_ALL=C`` (see :mod:`.file_commands` and :mod:`.text_commands` for the supported options,
:mod:`.shell` for the syntax). ``grep`` patterns are POSIX basic regular expressions (``-E`` extended, ``-F``
fixed strings), matched by the ``regex`` package under a time limit per command, so no pattern can hang a step
(``grep: regular expression too slow ...`` instead). Unknown commands print ``bash: NAME: command not found``.
Parsing a command line takes time linear in its length.

Splits
------
Everything is determined by ``(split, seed)``; the task type of seed ``s`` is ``types[s % len(types)]``.

* ``train``: training name pools and sizes (:data:`.generate.TRAIN_STYLE`), task types
  :data:`.tasks.TRAIN_TASK_TYPES` (six).
* ``heldout_trees``: the same six task types over trees from :data:`.generate.HELDOUT_STYLE`, whose service,
  people, department, region, product and file names are disjoint from train's (and logs and CSVs are longer),
  drawn from a separate random stream: no held-out tree equals a training tree.
* ``heldout_tasks``: train-style trees (their own random stream) with the two task types reserved for this split,
  :data:`.tasks.HELDOUT_TASK_TYPES` (``first_match_line``, ``csv_count_where``); they are answered with the same
  commands the training tasks use.

For tests and tools, :class:`Shell` runs command lines over any :class:`FileSystem` built from a dict.
"""

from lit_echo.envs.shellworld.env import SPLITS, ShellWorld
from lit_echo.envs.shellworld.filesystem import FileSystem
from lit_echo.envs.shellworld.shell import Shell
from lit_echo.envs.shellworld.tasks import HELDOUT_TASK_TYPES, TRAIN_TASK_TYPES, Task, answer_matches

__all__ = ["ShellWorld", "Shell", "FileSystem", "Task", "SPLITS", "TRAIN_TASK_TYPES", "HELDOUT_TASK_TYPES",
           "answer_matches"]
