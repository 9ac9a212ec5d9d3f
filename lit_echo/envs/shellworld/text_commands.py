"""Commands that filter text: ``head``, ``tail``, ``grep``, ``wc``, ``sort``, ``uniq``, ``cut``, ``echo``.

Supported options (GNU semantics, ``LC_ALL=C``):

* ``head``/``tail``: ``-n N`` (also ``-N``), ``head -n -N`` (all but the last N), ``tail -n +N`` (from line N);
  ``==> name <==`` headers for several files.
* ``grep PATTERN [FILE...]``: ``-c -i -v -n -l -o -w -x -r -h -H``; the pattern is a POSIX *basic* regular expression
  (``. * ^ $ [...]``, ``\\( \\) \\| \\+ \\?``), ``-E`` extended, ``-F`` fixed string. Several files (or ``-r``) prefix
  each line with ``name:``; ``-r`` without a path searches ``.`` and names files without ``./``, like GNU grep.
  Patterns run on the ``regex`` package's engine (it releases the GIL) with a time limit of
  :data:`GREP_TIME_LIMIT_S` seconds per command, and may be at most :data:`MAX_PATTERN_CHARS` long: a
  backtracking pattern such as ``(.*)*Z`` prints ``grep: regular expression too slow to match ...`` instead of
  hanging the step (Python's ``re`` has no time limit and holds the GIL, so nothing could stop it).
* ``wc``: ``-l -w -c``; counts right-aligned like GNU wc (width 1 for a single count of a single input, else the
  digits of the inputs' total size, at least 7 when reading a pipe), separated by spaces, then the name.
* ``sort``: ``-n -r -u -k N[,M] -t SEP``; ties broken by whole-line byte order, as GNU sort does.
* ``uniq``: ``-c`` (``%7d %s``), ``-d``, ``-u``.  ``cut``: ``-d SEP -f LIST`` and ``-c LIST``.  ``echo``: ``-n``.
"""

from __future__ import annotations

import re
import time
from functools import cmp_to_key
from typing import TYPE_CHECKING

import regex

from lit_echo.envs.shellworld.filesystem import PathError
from lit_echo.envs.shellworld.options import (
    CommandError,
    Output,
    join_lines,
    numeric_shorthand,
    parse_count,
    parse_options,
    read_inputs,
    split_lines,
    usage_error,
)

if TYPE_CHECKING:
    from lit_echo.envs.shellworld.shell import Shell

GREP_TIME_LIMIT_S = 2.0  # matching time one grep command may use, over all its lines
MAX_PATTERN_CHARS = 10_000
TOO_SLOW = f"grep: regular expression too slow to match (time limit {GREP_TIME_LIMIT_S:g} s)\n"


def _with_headers(inputs: list[tuple[str, str]], body, several: bool) -> str:
    parts = []
    for name, text in inputs:
        lines = body(split_lines(text))
        header = f"==> {name or 'standard input'} <==\n" if several else ""
        parts.append(header + join_lines(lines))
    return "\n".join(parts)


def head(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("head", numeric_shorthand(args), valued="n")
    n = parse_count("head", str(opts.get("n", "10")))
    inputs, err = read_inputs(shell, operands, stdin, lambda p, r: f"head: cannot open '{p}' for reading: {r}\n")
    body = (lambda lines: lines[:n]) if n >= 0 else (lambda lines: lines[:max(len(lines) + n, 0)])
    return _with_headers(inputs, body, len(operands) > 1), err


def tail(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("tail", numeric_shorthand(args), valued="n")
    value = str(opts.get("n", "10"))
    n = abs(parse_count("tail", value))
    inputs, err = read_inputs(shell, operands, stdin, lambda p, r: f"tail: cannot open '{p}' for reading: {r}\n")
    body = (lambda lines: lines[max(n - 1, 0):]) if value.startswith("+") else (lambda lines: lines[-n:] if n else [])
    return _with_headers(inputs, body, len(operands) > 1), err


def _posix_classes(bracket: str) -> str:
    classes = {"digit": r"\d", "alpha": "a-zA-Z", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
               "space": r"\s", "punct": r"!-/:-@\[-`{-~"}
    bracket = bracket.replace("\\", "\\\\")
    return re.sub(r"\[:(\w+):\]", lambda m: classes.get(m.group(1), m.group(0)), bracket)


def _bracket_end(pattern: str, start: int) -> int:
    """Index just past the bracket expression that opens at ``start`` (POSIX: a leading ``]`` is literal)."""
    j = start + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        close = pattern.find(":]", j + 2) if pattern.startswith("[:", j) else -1
        j = close + 2 if close >= 0 else j + 1
    if j >= len(pattern):
        raise CommandError("grep: Unmatched [, [^, [:, [., or [=\n")
    return j + 1


def _to_python_regex(pattern: str, extended: bool) -> str:
    """Translate a POSIX basic (or extended) regular expression into Python ``re`` syntax."""
    out, i = [], 0
    special = "+?|(){}"
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append(nxt if (nxt in special and not extended) else "\\" + nxt)
            i += 2
        elif c == "[":
            end = _bracket_end(pattern, i)
            out.append(_posix_classes(pattern[i:end]))
            i = end
        elif c == "*" and (not out or out[-1] in ("^", "(")):
            out.append(r"\*")  # a leading star is literal in POSIX regular expressions
            i += 1
        else:
            out.append("\\" + c if (c in special and not extended) else c)
            i += 1
    return "".join(out)


def _walk_files(shell: Shell, path: str, prefix: str | None = None) -> list[str]:
    """``path`` itself unless it is a directory; then every file below it, sorted, each name starting with
    ``prefix`` (default ``path/``) (for ``grep -r``)."""
    try:
        _, node = shell.fs.lookup(path, shell.cwd)
    except PathError:
        return [path]  # reported when read
    if not isinstance(node, dict):
        return [path]
    prefix = path.rstrip("/") + "/" if prefix is None else prefix
    return [name for child in sorted(node) for name in _walk_files(shell, prefix + child)]


def grep(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("grep", args, flags="civnlowxEFrhH", valued="e")
    if "e" in opts:
        pattern = str(opts["e"])
    elif operands:
        pattern, operands = operands[0], operands[1:]
    else:
        raise CommandError("Usage: grep [OPTION]... PATTERNS [FILE]...\nTry 'grep --help' for more information.\n")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise CommandError(f"grep: pattern too long (at most {MAX_PATTERN_CHARS} characters here)\n")
    source = regex.escape(pattern) if opts.get("F") else _to_python_regex(pattern, bool(opts.get("E")))
    if opts.get("w"):
        source = rf"(?<!\w)(?:{source})(?!\w)"
    if opts.get("x"):
        source = rf"^(?:{source})$"
    try:
        compiled = regex.compile(source, regex.VERSION0 | (regex.IGNORECASE if opts.get("i") else 0))
    except (regex.error, RecursionError, OverflowError):
        raise CommandError("grep: Invalid regular expression\n") from None
    deadline = time.monotonic() + GREP_TIME_LIMIT_S

    def left() -> float:
        return max(deadline - time.monotonic(), 1e-3)
    if opts.get("r"):
        operands = ([name for path in operands for name in _walk_files(shell, path)] if operands
                    else _walk_files(shell, ".", prefix=""))
    inputs, err = read_inputs(shell, operands, stdin, lambda p, r: f"grep: {p}: {r}\n")
    several = (len(operands) > 1 or bool(opts.get("r")) or bool(opts.get("H"))) and not opts.get("h")
    try:
        return join_lines(_grep_lines(compiled, inputs, opts, several, left)), err
    except TimeoutError:
        raise CommandError(err + TOO_SLOW) from None


def _grep_lines(compiled, inputs: list[tuple[str, str]], opts: dict, several: bool, left) -> list[str]:
    """grep's output lines; each match call gets the command's remaining time (``left()``)."""
    out: list[str] = []
    for name, text in inputs:
        prefix = f"{name or '(standard input)'}:" if several else ""
        hits = [(n, line) for n, line in enumerate(split_lines(text), 1)
                if bool(compiled.search(line, timeout=left(), concurrent=True)) != bool(opts.get("v"))]
        if opts.get("l"):
            out += [name or "(standard input)"] if hits else []
        elif opts.get("c"):
            out.append(f"{prefix}{len(hits)}")
        else:
            for n, line in hits:
                number = f"{n}:" if opts.get("n") else ""
                pieces = ([m.group(0) for m in compiled.finditer(line, timeout=left(), concurrent=True) if m.group(0)]
                          if opts.get("o") else [line])
                out += [prefix + number + piece for piece in pieces]
    return out


def wc(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("wc", args, flags="lwc")
    which = [k for k in "lwc" if opts.get(k)] or ["l", "w", "c"]
    inputs, err = read_inputs(shell, operands, stdin, lambda p, r: f"wc: {p}: {r}\n")
    rows = [([{"l": text.count("\n"), "w": len(text.split()), "c": len(text.encode())}[k] for k in which], name)
            for name, text in inputs]
    if len(operands) > 1:
        rows.append(([sum(r[0][i] for r in rows) for i in range(len(which))], "total"))
    if len(inputs) == 1 and len(operands) <= 1 and len(which) == 1:
        width = 1
    else:
        total_size = sum(len(text.encode()) for name, text in inputs if name)
        width = max(len(str(total_size)), 7 if any(not name for name, _ in inputs) else 1)
    lines = [" ".join(f"{c:>{width}}" for c in counts) + (f" {name}" if name else "") for counts, name in rows]
    return join_lines(lines), err


def _numeric_prefix(text: str) -> float:
    match = re.match(r"\s*(-?\d*\.?\d+)", text)
    return float(match.group(1)) if match else 0.0


def _sort_key_fn(opts: dict):
    separator = opts.get("t")
    if isinstance(separator, str) and len(separator) != 1:
        raise CommandError("sort: multi-character tab '" + separator + "'\n")
    spec = opts.get("k")
    if not isinstance(spec, str):
        return lambda line: line
    match = re.fullmatch(r"(\d+)(?:\.\d+)?([bnr]*)(?:,(\d+)(?:\.\d+)?([bnr]*))?", spec)
    if not match or int(match.group(1)) == 0:
        raise CommandError(f"sort: invalid number at field start: invalid count at start of '{spec}'\n")
    for letter in (match.group(2) or "") + (match.group(4) or ""):
        opts[letter] = True
    first = int(match.group(1)) - 1
    last = int(match.group(3)) if match.group(3) else None

    def key(line: str) -> str:
        if isinstance(separator, str):
            return separator.join(line.split(separator)[first:last])
        return "".join(re.findall(r"\s*\S+", line)[first:last])  # GNU: a field keeps its leading blanks

    return key


def sort(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("sort", args, flags="nru", valued="kt")
    key = _sort_key_fn(opts)
    inputs, err = read_inputs(shell, operands, stdin, lambda p, r: f"sort: cannot read: {p}: {r}\n")
    if err:
        return "", err
    lines = [line for _, text in inputs for line in split_lines(text)]

    def compare_keys(a: str, b: str) -> int:
        ka, kb = key(a), key(b)
        if opts.get("n"):
            ka, kb = _numeric_prefix(ka), _numeric_prefix(kb)  # type: ignore[assignment]
        return (ka > kb) - (ka < kb)

    def compare(a: str, b: str) -> int:
        result = compare_keys(a, b) or (0 if opts.get("u") else (a > b) - (a < b))
        return -result if opts.get("r") else result

    lines.sort(key=cmp_to_key(compare))
    if opts.get("u"):
        lines = [line for i, line in enumerate(lines) if i == 0 or compare_keys(lines[i - 1], line) != 0]
    return join_lines(lines), ""


def uniq(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("uniq", args, flags="cdu")
    if len(operands) > 1:
        raise usage_error("uniq", f"extra operand '{operands[1]}'")
    inputs, err = read_inputs(shell, operands, stdin, lambda p, r: f"uniq: {p}: {r}\n")
    groups: list[list] = []
    for _, text in inputs:
        for line in split_lines(text):
            if groups and groups[-1][0] == line:
                groups[-1][1] += 1
            else:
                groups.append([line, 1])
    if opts.get("d"):
        groups = [g for g in groups if g[1] > 1]
    if opts.get("u"):
        groups = [g for g in groups if g[1] == 1]
    lines = [f"{count:7d} {line}" if opts.get("c") else line for line, count in groups]
    return join_lines(lines), err


def _cut_list(spec: str) -> list[tuple[int, int]]:
    ranges = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d*)(-?)(\d*)", item)
        if not match or not (match.group(1) or match.group(3)):
            raise usage_error("cut", f"invalid field range '{item}'" if match else f"invalid field value '{item}'")
        lo = int(match.group(1) or 1)
        hi = int(match.group(3)) if match.group(3) else (1 << 30 if match.group(2) else lo)
        if lo == 0 or hi == 0:
            raise usage_error("cut", "fields are numbered from 1")
        ranges.append((lo, hi))
    return ranges


def cut(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("cut", args, valued="dfc")
    if "f" not in opts and "c" not in opts:
        raise usage_error("cut", "you must specify a list of bytes, characters, or fields")
    delimiter = str(opts.get("d", "\t"))
    if len(delimiter) != 1:
        raise usage_error("cut", "the delimiter must be a single character")
    ranges = _cut_list(str(opts.get("f") or opts.get("c")))

    def chosen(n: int) -> bool:
        return any(lo <= n <= hi for lo, hi in ranges)

    inputs, err = read_inputs(shell, operands, stdin, lambda p, r: f"cut: {p}: {r}\n")
    out = []
    for _, text in inputs:
        for line in split_lines(text):
            if "c" in opts:
                out.append("".join(ch for n, ch in enumerate(line, 1) if chosen(n)))
            elif delimiter not in line:
                out.append(line)  # GNU prints lines without the delimiter whole (no -s)
            else:
                fields = line.split(delimiter)
                out.append(delimiter.join(f for n, f in enumerate(fields, 1) if chosen(n)))
    return join_lines(out), err


def echo(shell: Shell, args: list[str], stdin: str | None) -> Output:
    if args and args[0] == "-n":
        return " ".join(args[1:]), ""
    return " ".join(args) + "\n", ""
