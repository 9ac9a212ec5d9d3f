"""Appending generated rollouts to a JSON-lines buffer that survives crashes and restarts.

Every group is written with one ``write``, flushed and ``os.fsync``'ed, so a crash loses at most the group in
flight. A crash in the middle of a write can leave a partial last line; opening the file again cuts it off
(everything before the last newline is complete records), so a restarted run appends valid lines after valid
lines and :class:`~lit_echo.data.buffer.RolloutBuffer` reads the file back with ``on_bad_record="raise"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from lit_echo.rollout import Rollout

log = logging.getLogger(__name__)


class RolloutWriter:
    """Appends rollouts to ``path`` (created with its directory if missing; never overwritten)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()
        self._file = open(self.path, "ab")
        self.written = 0

    def _drop_partial_line(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            # Find the last newline; everything after it is the unfinished record of an interrupted run.
            block, end = 1 << 16, size
            while end > 0:
                start = max(0, end - block)
                fh.seek(start)
                at = fh.read(end - start).rfind(b"\n")
                if at >= 0:
                    keep = start + at + 1
                    break
                end = start
            else:
                keep = 0
            fh.truncate(keep)
        log.warning("%s: dropped an incomplete last record (%d bytes) left by an interrupted run", self.path,
                    size - keep)

    def write_group(self, rollouts: Sequence[Rollout]) -> None:
        """Append one group durably (one JSON line per rollout)."""
        if not rollouts:
            return
        self._file.write("".join(r.to_json() + "\n" for r in rollouts).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written += len(rollouts)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
