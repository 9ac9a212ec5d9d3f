"""Expanding user-given file arguments (files, directories, globs) into a sorted list of files.

Pure standard library, so environment code (for example TextWorld's game finder) can use it without torch.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path


def find_files(paths: str | os.PathLike | Sequence[str | os.PathLike], suffixes: tuple[str, ...], *,
               what: str, recursive: bool = True) -> list[Path]:
    """The files named by ``paths``: each a file (taken whatever its name), a directory (its files ending in one
    of ``suffixes``, recursively) or a glob (``**`` recurses; matches ending in one of ``suffixes``). ``~`` is
    expanded. Sorted, so every worker and rank sees the same order. ``what`` names the files in the error raised
    when nothing is found, e.g. ``"rollout files (.jsonl, .jsonl.gz)"``. ``recursive=False``: a directory gives only
    its own files and ``**`` in a glob is a plain ``*``.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: set[Path] = set()
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found.update(p for p in (path.rglob("*") if recursive else path.iterdir())
                         if p.is_file() and p.name.endswith(suffixes))
        elif path.is_file():
            found.add(path)
        else:
            found.update(Path(p) for p in glob.glob(str(path), recursive=recursive)
                         if p.endswith(suffixes) and os.path.isfile(p))
    if not found:
        raise FileNotFoundError(f"no {what} found at {[str(i) for i in items]!r}: expected files, a directory "
                                "holding them, or a glob")
    return sorted(found)
