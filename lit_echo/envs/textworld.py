"""TextWorld text adventures (Microsoft TextWorld 1.7) as a lit_echo :class:`~lit_echo.envs.base.Environment`.

TextWorld is an optional dependency: ``pip install "lit-echo[textworld]"`` (pulls spacy and jericho; games are
generated offline). Make games once with ``tw-make`` or with this module's command line, which calls it::

    python -m lit_echo.envs.textworld --out games/textworld --games 32 --seed 0 \\
        --world-size 3 --nb-objects 6 --quest-length 3

Episodes
--------
``TextWorldEnv(games=...)`` takes game files (``.z8`` / ``.ulx``), a directory of them, or a glob; seed ``s``
plays ``games[s % len(games)]`` (sorted paths, so the mapping is stable). The opening messages are a system prompt
and the game's introduction (its ASCII-art banner removed), which states the objective.

Tool-call format
----------------
``command_format="plain"`` (default): the assistant's whole turn, stripped, is the game command (``go east``).
``command_format="cmd"``: the command goes inside ``<cmd>...</cmd>`` and free text around it is allowed, as in
ShellWorld; a turn with no (or several) ``<cmd>`` gets a ``StepResult.warning`` and the game does not advance.
An empty command gets a warning in both formats (the standard texts of :mod:`lit_echo.envs.actions`), and so
does a command that names one of the interpreter's own file or session commands (``save``, ``restore``,
``script``, ``quit``, ... :data:`BLOCKED_VERBS`), which never reaches the game: it would write into the working
directory. Control characters and backslashes in a command become spaces (the interpreter hangs on them). A
command TextWorld does not list as admissible in the current state is still sent to the game (its reply, e.g.
"That's not a verb I recognise.", is the observation) and counted with ``info["valid_action"] = False``.

Observations and reward
-----------------------
The observation is the game's reply without its trailing prompt and status bar (``>  -= Studio =-0/2``),
stripped, plus a final newline (the generator cuts long ones at its ``max_observation_chars``). The reward of a
step is the score it gained divided by the game's maximum score, so an episode that wins collects 1.0 in total.
The episode ends when the game is won or lost (the generator's ``max_turns`` ends it otherwise). ``info`` holds
``success`` (won), ``valid_action``, ``score``, ``max_score``, ``turn`` and ``task_type`` (``"textworld"``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from lit_echo.data.paths import find_files
from lit_echo.envs.actions import EMPTY_ACTION_WARNING, NO_ACTION_WARNING, extract_action
from lit_echo.envs.base import StepResult

GAME_SUFFIXES = (".z8", ".ulx")
EMPTY_COMMAND_WARNING = EMPTY_ACTION_WARNING.format(example="go north")
NO_CMD_WARNING = NO_ACTION_WARNING.format(block="<cmd></cmd>", example="<cmd>look</cmd>")
_BANNER_LINE = re.compile(r"^[\s$_|\\/<>]*$")  # the intro's ASCII-art title is drawn with these characters only
_PROMPT_TAIL = re.compile(r"\n>[^\n]*$")  # the input prompt, padded and followed by the status bar
# Control characters and backslashes: the game interpreter (jericho's dumb-frotz) spins forever on some control
# characters (\x00, \x13: a step that never returns; two such games in threads crashed the process), and reads a
# backslash as one of its own commands (\help, \s, ...: each step hung, one flooded its output). A game command
# needs neither; each becomes a space before the command is sent.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
# The interpreter's own commands that write or read files in the process's working directory (``save`` wrote
# ``<game>.qzl`` there, ``script`` a transcript named by whatever the policy typed next) or end the session. A
# policy's text never reaches them: anywhere in a command (Inform runs "look. save" as two commands), as a word.
BLOCKED_VERBS = ("save", "restore", "script", "unscript", "noscript", "transcript", "notranscript", "recording",
                 "replay", "quit", "q", "die", "restart")
_BLOCKED = re.compile(r"(?<![\w'-])(" + "|".join(BLOCKED_VERBS) + r")(?![\w'-])", re.IGNORECASE)
BLOCKED_COMMAND_WARNING = ("WARNING: `{verb}` is not available here (the game interpreter would write files or end "
                           "the session); nothing happened. Reply with a game command, for example: {example}")

SYSTEM_PROMPT = """You are playing a text adventure game. Each reply is one game command{how}, for example: look, \
inventory, go north, open chest, take key, unlock door with key, put apple on table. The game's answer comes back \
as the next message. Reach the objective in as few commands as you can."""


def _import_textworld():
    try:
        import textworld
    except ImportError as err:
        raise ImportError("TextWorldEnv needs TextWorld: pip install 'lit-echo[textworld]' (or textworld==1.7.0)"
                          ) from err
    return textworld


def find_games(games: str | os.PathLike | list[str | os.PathLike]) -> list[Path]:
    """Sorted game files named by ``games``: files, directories (their ``*.z8`` / ``*.ulx``) or globs."""
    try:
        return find_files(games, GAME_SUFFIXES, what="TextWorld games (*.z8, *.ulx)", recursive=False)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; make some with `python -m lit_echo.envs.textworld --out DIR` or tw-make"
                                ) from None


def clean_feedback(text: str) -> str:
    """The game's reply without the intro banner, the input prompt and the status bar; one final newline."""
    lines = text.split("\n")
    while lines and _BANNER_LINE.match(lines[0]):
        lines.pop(0)
    body = _PROMPT_TAIL.sub("", "\n".join(lines)).strip()
    return body + "\n" if body else ""


class TextWorldEnv:
    """One TextWorld game per episode (see the module docstring for the formats).

    Args:
        games: game files, a directory or a glob (made by ``tw-make``).
        command_format: ``"plain"`` (the turn is the command) or ``"cmd"`` (``<cmd>...</cmd>``).
    """

    def __init__(self, games: str | list[str], command_format: Literal["plain", "cmd"] = "plain"):
        if command_format not in ("plain", "cmd"):
            raise ValueError(f"command_format: expected 'plain' or 'cmd', got {command_format!r}")
        self._textworld = _import_textworld()
        self.games = find_games(games)
        self.command_format = command_format
        self._env: Any = None
        self._game: Path | None = None
        self._state: Any = None
        self.turn = 0
        self.done = True

    def reset(self, seed: int) -> list[dict[str, str]]:
        game = self.games[seed % len(self.games)]
        if game != self._game:
            self.close()
            infos = self._textworld.EnvInfos(objective=True, max_score=True, won=True, lost=True, score=True,
                                             admissible_commands=True)
            self._env = self._textworld.start(str(game), request_infos=infos)
            self._game = game
        self._state = self._env.reset()
        self.turn = 0
        self.done = False
        how = " inside <cmd></cmd>" if self.command_format == "cmd" else " and nothing else"
        return [{"role": "system", "content": SYSTEM_PROMPT.format(how=how)},
                {"role": "user", "content": clean_feedback(self._state.feedback)}]

    def step(self, action: str, truncated: bool = False) -> StepResult:
        """Send the turn's command to the game; ``truncated``: the turn was cut at the token limit."""
        if self.done or self._state is None:
            raise RuntimeError("step() called on a finished episode; call reset(seed) first")
        self.turn += 1
        tag, example = ("cmd", "look") if self.command_format == "cmd" else (None, "go north")
        parsed = extract_action(action, tag, example=example, truncated=truncated)
        command = parsed.action
        if command is None:
            return self._result("", parsed.warning, gained=0, valid=False)
        command = " ".join(_CONTROL.sub(" ", command).split())
        if not command:
            return self._result("", EMPTY_ACTION_WARNING.format(example=example), gained=0, valid=False)
        blocked = _BLOCKED.search(command)
        if blocked:
            return self._result("", BLOCKED_COMMAND_WARNING.format(verb=blocked.group(1).lower(), example=example),
                                gained=0, valid=False)
        admissible = set(self._state.admissible_commands or [])
        before = self._state.score
        self._state, _, game_over = self._env.step(command)
        if game_over:
            self.done = True
        return self._result(clean_feedback(self._state.feedback), None, gained=self._state.score - before,
                            valid=command in admissible)

    def _result(self, observation: str, warning: str | None, *, gained: float, valid: bool) -> StepResult:
        max_score = self._state.max_score or 1
        info = {"success": bool(self._state.won), "valid_action": valid, "score": self._state.score,
                "max_score": max_score, "turn": self.turn, "task_type": "textworld"}
        return StepResult(observation, warning, reward=gained / max_score, done=self.done, info=info)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._game, self._state = None, None, None


def make_games(out: str | os.PathLike, games: int = 16, seed: int = 0, world_size: int = 3, nb_objects: int = 6,
               quest_length: int = 3) -> list[Path]:
    """Generate ``games`` custom TextWorld games with ``tw-make`` (seeds ``seed .. seed+games-1``) into ``out``;
    existing files are kept, so a second call is free. Returns the game paths (about 3 s per new game)."""
    # The script sits next to the interpreter of a virtual environment that is not activated (e.g. under pytest).
    tw_make = shutil.which("tw-make") or shutil.which("tw-make", path=os.path.dirname(sys.executable))
    if tw_make is None:
        raise FileNotFoundError("tw-make is not on PATH: pip install 'lit-echo[textworld]'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for game_seed in range(seed, seed + games):
        path = out / f"tw-w{world_size}-o{nb_objects}-q{quest_length}-s{game_seed}.z8"
        if not path.exists():
            subprocess.run([tw_make, "custom", "--world-size", str(world_size), "--nb-objects", str(nb_objects),
                            "--quest-length", str(quest_length), "--seed", str(game_seed), "--output", str(path),
                            "--silent", "-f"], check=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate TextWorld games offline with tw-make.")
    parser.add_argument("--out", required=True, help="directory for the .z8 games")
    parser.add_argument("--games", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("--nb-objects", type=int, default=6)
    parser.add_argument("--quest-length", type=int, default=3)
    args = parser.parse_args(argv)
    paths = make_games(args.out, args.games, args.seed, args.world_size, args.nb_objects, args.quest_length)
    print(f"{len(paths)} games in {args.out}")


if __name__ == "__main__":
    main()
