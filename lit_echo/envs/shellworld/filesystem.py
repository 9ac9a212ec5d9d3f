"""An in-memory, read-only file tree: path resolution, glob expansion and file metadata.

A tree is a nested dict: a directory maps names to children, a file is its text content (a ``str``)::

    {"logs": {"app.log": "line 1\\n", "archive": {}}, "README.md": "# Demo\\n"}

The tree given to :class:`FileSystem` becomes the home directory (``/home/user`` by default); nothing outside the
tree exists except the directories leading to it. Metadata (``ls -l``) is derived from the path alone, so the same
tree always lists the same way.
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass

Node = dict | str

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_GLOB_CHARS = frozenset("*?[")


class PathError(Exception):
    """A path that cannot be used; ``reason`` is the strerror text (``No such file or directory``, ...)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


NOT_FOUND = "No such file or directory"
NOT_A_DIR = "Not a directory"
IS_A_DIR = "Is a directory"


@dataclass(frozen=True)
class Stat:
    """What ``ls -l`` shows about a node."""

    is_dir: bool
    size: int  # bytes; 4096 for directories
    links: int  # 1 for files, 2 + number of subdirectories for directories
    mtime: str  # already formatted like ``ls -l``: ``Mar  3 10:15``

    @property
    def blocks_kib(self) -> int:
        """Allocated size in KiB as ``ls -l``'s ``total`` line counts it (4 KiB blocks)."""
        return 4 if self.is_dir else -(-self.size // 4096) * 4


def has_glob(word: str) -> bool:
    return any(c in _GLOB_CHARS for c in word)


class FileSystem:
    """A read-only tree mounted at ``home``; paths are resolved against a current directory the caller keeps.

    Absolute paths are strings starting with ``/``; internally a location is a tuple of names from the root.
    """

    def __init__(self, tree: dict, home: str = "/home/user"):
        self.home = home
        self.home_parts = tuple(p for p in home.split("/") if p)
        root: dict = tree
        for name in reversed(self.home_parts):
            root = {name: root}
        self.root = root

    # -- resolution -----------------------------------------------------------------------------------------

    def normalize(self, path: str, cwd: tuple[str, ...]) -> tuple[str, ...]:
        """The location ``path`` names, checked to exist; raises :class:`PathError` (``path`` as given)."""
        parts = list(cwd) if not path.startswith("/") else []
        node = self.node(tuple(parts))
        for name in path.split("/"):
            if name in ("", "."):
                if not isinstance(node, dict):
                    raise PathError(path, NOT_A_DIR)
                continue
            if not isinstance(node, dict):
                raise PathError(path, NOT_A_DIR)
            if name == "..":
                if parts:
                    parts.pop()
                node = self.node(tuple(parts))
                continue
            if name not in node:
                raise PathError(path, NOT_FOUND)
            parts.append(name)
            node = node[name]
        if path.endswith("/") and not isinstance(node, dict):
            raise PathError(path, NOT_A_DIR)
        return tuple(parts)

    def node(self, parts: tuple[str, ...]) -> Node:
        """The node at an already normalized location."""
        node: Node = self.root
        for name in parts:
            node = node[name]  # type: ignore[index]
        return node

    def lookup(self, path: str, cwd: tuple[str, ...]) -> tuple[tuple[str, ...], Node]:
        parts = self.normalize(path, cwd)
        return parts, self.node(parts)

    def read_file(self, path: str, cwd: tuple[str, ...]) -> str:
        """A file's text; raises :class:`PathError` for missing paths and directories."""
        _, node = self.lookup(path, cwd)
        if isinstance(node, dict):
            raise PathError(path, IS_A_DIR)
        return node

    def display(self, parts: tuple[str, ...]) -> str:
        return "/" + "/".join(parts)

    # -- metadata ---------------------------------------------------------------------------------------------

    def stat(self, parts: tuple[str, ...]) -> Stat:
        node = self.node(parts)
        # mtime from the path's checksum: deterministic, varied, always within the current year (no year shown).
        h = zlib.crc32("/".join(parts).encode())
        mtime = f"{_MONTHS[h % 6]} {1 + (h >> 3) % 28:2d} {(h >> 8) % 24:02d}:{(h >> 13) % 60:02d}"
        if isinstance(node, dict):
            subdirs = sum(isinstance(child, dict) for child in node.values())
            return Stat(True, 4096, 2 + subdirs, mtime)
        return Stat(False, len(node.encode()), 1, mtime)

    # -- globbing ---------------------------------------------------------------------------------------------

    def glob(self, pattern: str, cwd: tuple[str, ...]) -> list[str]:
        """Bash pathname expansion of ``pattern`` (``*``, ``?``, ``[...]``), sorted; ``[]`` when nothing matches.

        Matches are spelled like the pattern (relative stays relative). Hidden names match only a pattern
        component that starts with a dot.
        """
        absolute = pattern.startswith("/")
        components = [c for c in pattern.split("/") if c]
        found: list[tuple[str, tuple[str, ...]]] = [("/" if absolute else "", () if absolute else cwd)]
        for i, component in enumerate(components):
            last = i == len(components) - 1
            step: list[tuple[str, tuple[str, ...]]] = []
            for shown, parts in found:
                node = self.node(parts)
                if not isinstance(node, dict):
                    continue
                prefix = shown if shown in ("", "/") else shown + "/"
                if not has_glob(component):
                    try:
                        target = self.normalize(component, parts)
                    except PathError:
                        continue
                    step.append((prefix + component, target))
                    continue
                for name in sorted(node):
                    if name.startswith(".") and not component.startswith("."):
                        continue
                    if fnmatch.fnmatchcase(name, component) and (last or isinstance(node[name], dict)):
                        step.append((prefix + name, parts + (name,)))
            found = step
        suffix = "/" if pattern.endswith("/") else ""
        return sorted(shown + suffix for shown, _ in found)
