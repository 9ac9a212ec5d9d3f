"""Commands that walk the tree: ``ls``, ``cd``, ``pwd``, ``cat``, ``find``.

``ls`` prints one name per line (its output is not a terminal, as with ``ls | cat``), sorted like ``LC_ALL=C ls``;
options ``-l -a -1 -h -r -S -d -R``. ``find`` lists depth-first in ``LC_ALL=C`` name order (GNU find uses
directory order, which a simulated tree does not have) and supports ``-name``, ``-iname``, ``-type f|d``,
``-maxdepth``, ``-mindepth``.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from lit_echo.envs.shellworld.filesystem import NOT_A_DIR, PathError, Stat
from lit_echo.envs.shellworld.options import CommandError, Output, parse_options

if TYPE_CHECKING:
    from lit_echo.envs.shellworld.shell import Shell


def _human(size: int) -> str:
    """``ls -h`` sizes: bytes below 1 KiB; above, one decimal below 10 and whole units from 10 on, rounded up."""
    if size < 1024:
        return str(size)
    for power, unit in ((1, "K"), (2, "M"), (3, "G")):
        base = 1024**power
        if size < 1024 * base or unit == "G":
            tenths = -(-size * 10 // base)
            return f"{tenths // 10}.{tenths % 10}{unit}" if tenths < 100 else f"{-(-size // base)}{unit}"
    raise AssertionError("unreachable")


def _long_lines(shell: Shell, entries: list[tuple[str, Stat]], human: bool) -> list[str]:
    sizes = [_human(st.size) if human else str(st.size) for _, st in entries]
    link_w = max((len(str(st.links)) for _, st in entries), default=1)
    size_w = max((len(s) for s in sizes), default=1)
    user = shell.user
    lines = []
    for (name, st), size in zip(entries, sizes):
        mode = "drwxr-xr-x" if st.is_dir else "-rw-r--r--"
        lines.append(f"{mode} {st.links:>{link_w}} {user} {user} {size:>{size_w}} {st.mtime} {name}")
    return lines


def _order(entries: list[tuple[str, Stat]], opts: dict) -> list[tuple[str, Stat]]:
    entries = sorted(entries, key=lambda e: e[0])
    if opts.get("S"):
        entries = sorted(entries, key=lambda e: -e[1].size)
    return entries[::-1] if opts.get("r") else entries


def _render(shell: Shell, entries: list[tuple[str, Stat]], opts: dict, total: bool) -> list[str]:
    entries = _order(entries, opts)
    if not opts.get("l"):
        return [name for name, _ in entries]
    head = [f"total {sum(st.blocks_kib for _, st in entries)}"] if total else []
    return head + _long_lines(shell, entries, bool(opts.get("h")))


def _dir_blocks(shell: Shell, path: str, parts: tuple[str, ...], opts: dict, header: bool) -> list[list[str]]:
    """The listing of one directory, and with ``-R`` those of its subdirectories after it."""
    node = shell.fs.node(parts)
    entries = [(name, shell.fs.stat(parts + (name,))) for name in node if opts.get("a") or not name.startswith(".")]
    if opts.get("a"):
        entries += [(".", shell.fs.stat(parts)), ("..", shell.fs.stat(parts[:-1]))]
    blocks = [([f"{path}:"] if header else []) + _render(shell, entries, opts, total=True)]
    if opts.get("R"):
        for name, st in _order(entries, opts):
            if st.is_dir and name not in (".", ".."):
                child = f"{path.rstrip('/') or '/'}/{name}".replace("//", "/")
                blocks += _dir_blocks(shell, child, parts + (name,), opts, header=True)
    return blocks


def ls(shell: Shell, args: list[str], stdin: str | None) -> Output:
    opts, operands = parse_options("ls", args, flags="la1hrSdR")
    operands = operands or ["."]
    err, files, dirs = "", [], []
    for path in sorted(operands):
        try:
            parts, node = shell.fs.lookup(path, shell.cwd)
        except PathError as e:
            err += f"ls: cannot access '{path}': {e.reason}\n"
            continue
        (dirs if isinstance(node, dict) and not opts.get("d") else files).append((path, parts))
    blocks: list[list[str]] = []
    if files:
        blocks.append(_render(shell, [(p, shell.fs.stat(parts)) for p, parts in files], opts, total=False))
    for path, parts in dirs:
        blocks += _dir_blocks(shell, path, parts, opts, header=len(operands) > 1 or bool(opts.get("R")))
    out = "\n".join("".join(line + "\n" for line in block) for block in blocks)
    return out, err


def cd(shell: Shell, args: list[str], stdin: str | None) -> Output:
    if len(args) > 1:
        return "", "bash: cd: too many arguments\n"
    target = args[0] if args else shell.fs.home
    try:
        parts, node = shell.fs.lookup(target, shell.cwd)
    except PathError as e:
        return "", f"bash: cd: {target}: {e.reason}\n"
    if not isinstance(node, dict):
        return "", f"bash: cd: {target}: {NOT_A_DIR}\n"
    shell.cwd = parts
    return "", ""


def pwd(shell: Shell, args: list[str], stdin: str | None) -> Output:
    return shell.fs.display(shell.cwd) + "\n", ""


def cat(shell: Shell, args: list[str], stdin: str | None) -> Output:
    _, operands = parse_options("cat", args)
    if not operands:
        return stdin or "", ""
    out, err = "", ""
    for path in operands:
        if path == "-":
            out += stdin or ""
            continue
        try:
            out += shell.fs.read_file(path, shell.cwd)
        except PathError as e:
            err += f"cat: {path}: {e.reason}\n"
    return out, err


_FIND_VALUED = ("-name", "-iname", "-type", "-maxdepth", "-mindepth")


def _find_expression(args: list[str]) -> dict:
    tests: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg not in _FIND_VALUED:
            if arg.startswith("-"):
                raise CommandError(f"find: unknown predicate '{arg}'\n")
            raise CommandError(f"find: paths must precede expression: '{arg}'\n")
        if i + 1 >= len(args):
            raise CommandError(f"find: missing argument to '{arg}'\n")
        value = args[i + 1]
        if arg == "-type" and value not in ("f", "d"):
            raise CommandError(f"find: Unknown argument to -type: {value}\n")
        if arg in ("-maxdepth", "-mindepth") and not value.isdigit():
            raise CommandError(f"find: Expected a positive decimal integer argument to {arg}, but got '{value}'\n")
        tests[arg] = int(value) if arg.endswith("depth") else value
        i += 2
    return tests


def find(shell: Shell, args: list[str], stdin: str | None) -> Output:
    n_paths = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    paths, tests = args[:n_paths] or ["."], _find_expression(args[n_paths:])
    out, err = [], ""

    def keep(name: str, is_dir: bool, depth: int) -> bool:
        if depth < tests.get("-mindepth", 0):
            return False
        if "-type" in tests and (tests["-type"] == "d") != is_dir:
            return False
        if "-name" in tests and not fnmatch.fnmatchcase(name, tests["-name"]):
            return False
        return "-iname" not in tests or fnmatch.fnmatchcase(name.lower(), tests["-iname"].lower())

    def walk(shown: str, node, depth: int) -> None:
        name = shown.rstrip("/").rsplit("/", 1)[-1] or "/"
        if keep(name, isinstance(node, dict), depth):
            out.append(shown)
        if isinstance(node, dict) and depth < tests.get("-maxdepth", 1 << 30):
            for child in sorted(node):
                walk(shown.rstrip("/") + "/" + child, node[child], depth + 1)

    for path in paths:
        try:
            _, node = shell.fs.lookup(path, shell.cwd)
        except PathError as e:
            err += f"find: '{path}': {e.reason}\n"
            continue
        walk(path, node, 0)
    return "".join(line + "\n" for line in out), err

