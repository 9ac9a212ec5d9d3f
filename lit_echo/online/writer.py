"""Appending generated rollouts to a JSON-lines buffer that survives crashes and restarts.

Every group is written with one ``write``, flushed and ``os.fsync``'ed, so a crash loses at most the group in
flight. A crash in the middle of a write can leave a partial last line; opening the file again cuts it off
(everything before the last newline is complete records), so a restarted run appends valid lines after valid
lines and :class:`~lit_echo.data.buffer.RolloutBuffer` reads the file back with ``on_bad_record="raise"``.

Groups are written when generated, which is ahead of the step that trains on them. :meth:`RolloutWriter.set_aside_tail`
moves the trailing records that were not trained (see ``OnlineRolloutDataModule``, "Exactly once") to a side file
``<name>.untrained`` beside the buffer: the buffer keeps whole lines, and nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
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

    def set_aside_tail(self, untrained: Callable[[dict], bool]) -> int:
        """Move the longest run of trailing records for which ``untrained(record)`` is true to
        ``<path>.untrained`` (appended, fsync'ed before the buffer is cut) and cut the buffer before them.

        ``record`` is the parsed JSON line. The scan goes backwards from the end and stops at the first record
        that does not match, so it reads only the tail. Returns the number of records moved."""
        self._file.flush()
        with open(self.path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            cut, moved = size, 0
            for start, line in _lines_backwards(fh, size):
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if not isinstance(record, dict) or not untrained(record):
                    break
                cut, moved = start, moved + 1
            if not moved:
                return 0
            fh.seek(cut)
            tail = fh.read(size - cut)
            side = self.path.with_name(self.path.name + ".untrained")
            with open(side, "ab") as out:
                out.write(tail)
                out.flush()
                os.fsync(out.fileno())
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
        log.info("%s: moved %d untrained records to %s", self.path, moved, side)
        return moved

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


def _lines_backwards(fh, size: int, block: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
    """(start offset, line without its newline) of each complete line of ``fh``, last line first."""
    end, pending = size, b""
    while end > 0:
        start = max(0, end - block)
        fh.seek(start)
        pending = fh.read(end - start) + pending
        end = start
        # Every newline in ``pending`` except the final one ends a line whose start is known.
        while True:
            at = pending.rfind(b"\n", 0, len(pending) - 1)
            if at < 0:
                break
            yield end + at + 1, pending[at + 1:].rstrip(b"\n")
            pending = pending[:at + 1]
    if pending:
        yield 0, pending.rstrip(b"\n")
