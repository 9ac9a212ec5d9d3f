"""The shell: parse one command line, expand words, run a pipeline of simulated commands, return its text.

Supported syntax: words, single and double quotes, backslash escapes, ``~`` (the home directory), globs
(``*``, ``?``, ``[...]``; an unmatched glob stays literal, as in bash) and pipes ``|``. Redirections, command lists
(``;``, ``&&``, ``||``, newlines), background jobs, substitutions and variables are not available; using them
prints a one-line error. The text returned is every stage's stderr followed by the last stage's stdout, which is
what a terminal shows for these short pipelines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lit_echo.envs.shellworld import file_commands, text_commands
from lit_echo.envs.shellworld.filesystem import FileSystem, has_glob
from lit_echo.envs.shellworld.options import Command, CommandError

COMMANDS: dict[str, Command] = {
    "ls": file_commands.ls, "cd": file_commands.cd, "pwd": file_commands.pwd, "cat": file_commands.cat,
    "find": file_commands.find, "head": text_commands.head, "tail": text_commands.tail,
    "grep": text_commands.grep, "wc": text_commands.wc, "sort": text_commands.sort,
    "uniq": text_commands.uniq, "cut": text_commands.cut, "echo": text_commands.echo,
}

_UNSUPPORTED = {";": ";", "&": "&", ">": ">", "<": "<", "`": "`", "\n": "newline"}
# A run of characters with no meaning to the shell; matched in one step (a single character class: linear).
_ORDINARY = re.compile(r"[^ \t|'\"\\;&<>`\n$*?\[~]+")
# Inside double quotes a backslash escapes only these (bash); before anything else it is kept.
_DOUBLE_QUOTE_ESCAPES = '"\\$`'


class ShellSyntaxError(Exception):
    """A command line the shell refuses; the message is the stderr line."""


@dataclass
class Word:
    """One shell word after quote removal; ``glob`` when it holds an unquoted ``* ? [``, ``tilde`` when it
    starts with an unquoted ``~``."""

    text: str
    glob: bool = False
    tilde: bool = False


def _double_quoted(line: str, start: int) -> tuple[str, int]:
    """The text of the double-quoted string whose opening quote is at ``start``, and the index past its end."""
    pieces, i = [], start + 1
    while True:
        quote, backslash = line.find('"', i), line.find("\\", i)
        if quote < 0:
            raise ShellSyntaxError("bash: unexpected EOF while looking for matching '\"'\n")
        if backslash < 0 or backslash > quote:
            pieces.append(line[i:quote])
            return "".join(pieces), quote + 1
        pieces.append(line[i:backslash])
        escaped = line[backslash + 1:backslash + 2]
        pieces.append(escaped if escaped in _DOUBLE_QUOTE_ESCAPES and escaped else "\\" + escaped)
        i = backslash + 2


def tokenize(line: str) -> list[list[Word]]:
    """Split a command line into pipeline stages of words; raises :class:`ShellSyntaxError`.

    Linear in ``len(line)``: each character is looked at a bounded number of times and a word's text is joined
    once from its pieces.
    """
    stages: list[list[Word]] = [[]]
    pieces: list[str] | None = None  # the current word's text, in pieces; None between words
    glob = tilde = False

    def end_word() -> None:
        nonlocal pieces
        if pieces is not None:
            stages[-1].append(Word("".join(pieces), glob=glob, tilde=tilde))
            pieces = None

    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t":
            end_word()
            i += 1
            continue
        if c == "|":
            if line.startswith("||", i):
                raise ShellSyntaxError("bash: '||' is not supported here; only pipes (|) are available\n")
            end_word()
            if not stages[-1]:
                raise ShellSyntaxError("bash: syntax error near unexpected token '|'\n")
            stages.append([])
            i += 1
            continue
        if c in _UNSUPPORTED or line.startswith("$(", i):
            op = "&&" if line.startswith("&&", i) else _UNSUPPORTED.get(c, "$(")
            raise ShellSyntaxError(f"bash: '{op}' is not supported here; only pipes (|) are available\n")
        if pieces is None:
            pieces, glob, tilde = [], False, c == "~"
        if c == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise ShellSyntaxError("bash: unexpected EOF while looking for matching '''\n")
            pieces.append(line[i + 1:end])
            i = end + 1
        elif c == '"':
            text, i = _double_quoted(line, i)
            pieces.append(text)
        elif c == "\\" and i + 1 < n:
            pieces.append(line[i + 1])
            i += 2
        else:
            match = _ORDINARY.match(line, i)
            end = match.end() if match else i + 1  # a lone special character (* ? [ ~ $ or a final \\)
            glob |= not match and c in "*?["
            pieces.append(line[i:end])
            i = end
    end_word()
    if not stages[-1]:
        if len(stages) > 1:
            raise ShellSyntaxError("bash: syntax error: unexpected end of file\n")
        return []
    return stages


class Shell:
    """A shell session over a :class:`FileSystem`: keeps the current directory across :meth:`run` calls."""

    def __init__(self, fs: FileSystem):
        self.fs = fs
        self.cwd: tuple[str, ...] = fs.home_parts
        self.user = fs.home_parts[-1] if fs.home_parts else "root"

    def _expand(self, word: Word) -> list[str]:
        text = word.text
        if word.tilde and (text == "~" or text.startswith("~/")):
            text = self.fs.home + text[1:]
        if word.glob and has_glob(text):
            return self.fs.glob(text, self.cwd) or [text]
        return [text]

    def run(self, line: str) -> str:
        """Run one command line and return what the terminal shows (stderr, then stdout)."""
        try:
            stages = tokenize(line.strip())
        except ShellSyntaxError as e:
            return str(e)
        stdin: str | None = None
        errors = ""
        for words in stages:
            argv = [text for word in words for text in self._expand(word)]
            name, args = argv[0], argv[1:]
            command = COMMANDS.get(name)
            if command is None:
                stdin, err = "", f"bash: {name}: command not found\n"
            else:
                try:
                    stdin, err = command(self, args, stdin)
                except CommandError as e:
                    stdin, err = "", str(e)
            errors += err
        return errors + (stdin or "")
