"""What every ShellWorld command shares: GNU-style option parsing, input reading and line splitting.

A command is ``fn(shell, args, stdin) -> (stdout, stderr)``; ``stdin`` is the previous pipeline stage's output or
None at the start of a pipeline. Messages follow GNU coreutils under ``LC_ALL=C`` (plain ASCII quotes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lit_echo.envs.shellworld.filesystem import PathError

if TYPE_CHECKING:
    from lit_echo.envs.shellworld.shell import Shell

Output = tuple[str, str]  # (stdout, stderr)
Command = Callable[["Shell", list[str], "str | None"], Output]


class CommandError(Exception):
    """A command that fails before producing output; the message is its whole stderr (newline included)."""


def usage_error(cmd: str, message: str) -> CommandError:
    return CommandError(f"{cmd}: {message}\nTry '{cmd} --help' for more information.\n")


def parse_options(cmd: str, args: list[str], flags: str = "", valued: str = "") -> tuple[dict, list[str]]:
    """GNU getopt: single-letter ``flags`` and ``valued`` options (``-n 5`` or ``-n5``), clustering (``-ci``),
    options after operands, ``--`` ending options. Returns ``({letter: True | value}, operands)``."""
    opts: dict[str, str | bool] = {}
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if arg.startswith("--"):
            raise usage_error(cmd, f"unrecognized option '{arg}'")
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in flags:
                opts[letter] = True
            elif letter in valued:
                if j < len(arg):
                    opts[letter] = arg[j:]
                elif i < len(args):
                    opts[letter] = args[i]
                    i += 1
                else:
                    raise usage_error(cmd, f"option requires an argument -- '{letter}'")
                break
            else:
                raise usage_error(cmd, f"invalid option -- '{letter}'")
    return opts, operands


def split_lines(text: str) -> list[str]:
    """Lines without their newlines; a final unterminated line still counts."""
    if not text:
        return []
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") else lines


def join_lines(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def read_inputs(shell: Shell, operands: list[str], stdin: str | None,
                error: Callable[[str, str], str]) -> tuple[list[tuple[str, str]], str]:
    """``[(name, text)]`` for each readable operand (``-`` or none at all: stdin, named ``""``) and the stderr
    of the others, each line made by ``error(path, reason)``."""
    if not operands:
        return [("", stdin or "")], ""
    inputs: list[tuple[str, str]] = []
    err = ""
    for path in operands:
        if path == "-":
            inputs.append(("", stdin or ""))
            continue
        try:
            inputs.append((path, shell.fs.read_file(path, shell.cwd)))
        except PathError as e:
            err += error(path, e.reason)
    return inputs, err


def parse_count(cmd: str, value: str, what: str = "number of lines") -> int:
    if not value.lstrip("+-").isdigit():
        raise CommandError(f"{cmd}: invalid {what}: '{value}'\n")
    return int(value)


def numeric_shorthand(args: list[str]) -> list[str]:
    """``head -5`` is ``head -n 5``; the value of a preceding ``-n`` (``-n -5``) is left alone."""
    return ["-n" + a[1:] if a[:1] == "-" and a[1:].isdigit() and (i == 0 or args[i - 1] != "-n") else a
            for i, a in enumerate(args)]
