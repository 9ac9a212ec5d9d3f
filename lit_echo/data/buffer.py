"""Streaming offline rollout buffer: JSON-lines files read lazily, shuffled with a seeded buffer, sharded.

Records are cut into *groups*: maximal runs of consecutive lines with the same non-empty ``group_id`` (writers
emit a group's rollouts together). A group is the unit of sharding, so GRPO advantages are computed over the
whole group even when workers and ranks split the stream; every record is read by exactly one (rank, worker)
per epoch. Only one group and the shuffle buffer are held in memory.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lit_echo.advantages import grpo_advantages
from lit_echo.data.records import parse_record, peek_group_id
from lit_echo.rollout import BadRecordError, Rollout

log = logging.getLogger(__name__)

_SUFFIXES = (".jsonl", ".jsonl.gz")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by ``paths``: each a file, a directory (its ``*.jsonl`` / ``*.jsonl.gz``, recursively) or a
    glob. Sorted, so every worker and rank sees the same order."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: set[Path] = set()
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
        elif path.is_file():
            found.add(path)
        else:
            matches = [Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)]
            found.update(p for p in matches if p.is_file())
    if not found:
        raise FileNotFoundError(f"no rollout files found at {items!r}: expected .jsonl / .jsonl.gz files, a "
                                "directory holding them, or a glob")
    return sorted(found)


def _gzip_chunks(fh, chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-member) gzip stream, yielded as they come, so a file cut short
    by a crash still gives everything before the cut before the error."""
    decoder = zlib.decompressobj(wbits=31)
    while True:
        data = fh.read(chunk_size)
        if not data:
            if not decoder.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            return
        while data:
            yield decoder.decompress(data)
            if not decoder.eof:
                break
            data = decoder.unused_data  # appended gzip members (a run that restarted and appended)
            decoder = zlib.decompressobj(wbits=31)
            if not data:
                data = fh.read(chunk_size)
                if not data:
                    return


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line, gzip by suffix."""
    with open(path, "rb") as fh:
        if not path.name.endswith(".gz"):
            for number, raw in enumerate(fh, start=1):
                if raw.strip():
                    yield number, raw
            return
        number, pending = 0, b""
        for chunk in _gzip_chunks(fh):
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                number += 1
                if raw.strip():
                    yield number, raw
        if pending.strip():
            yield number + 1, pending


def _dist_rank() -> tuple[int, int] | None:
    """(rank, world size) of the initialised default process group, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


@dataclass
class BufferItem:
    """A rollout plus how many bad records this reader skipped since the previous item (for logging)."""

    rollout: Rollout
    skipped: int = 0


class RolloutBuffer(IterableDataset):
    """Iterable over the rollouts of JSON-lines files (tokenized or messages records, see lit_echo.rollout).

    Args:
        paths: file, directory, glob, or a list of them.
        tokenizer: tokenizes messages records (body-only roles); may be None for tokenized-only buffers.
        shuffle: shuffle file order and records (seeded by ``seed`` and the epoch).
        shuffle_buffer: records held for shuffling (memory bound).
        seed: base seed.
        repeat: cycle epochs forever (step-based training; every rank keeps producing, so DDP never hangs on
            uneven shards); False gives one pass per iteration.
        on_bad_record: "raise" stops with a :class:`BadRecordError` naming file, line, field and expected form;
            "skip" logs it and counts it in ``BufferItem.skipped``.
        grpo_scale_by_std: GRPO (True) or Dr. GRPO (False) for records without an ``advantage``.
        shard: override (index, count) of this reader; default from DDP rank and dataloader worker.
        skip_batches, batch_size: resume support: the first ``skip_batches`` batches of ``batch_size`` items that a
            DataLoader over this buffer would deliver (workers deliver batches in turn) are read and dropped.

    The DDP rank is read in the process that builds the buffer or starts iterating it (dataloader workers do not
    see the process group), so build it after the process group is up, as Lightning's ``*_dataloader`` hooks do.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any = None, *,
                 shuffle: bool = True, shuffle_buffer: int = 1024, seed: int = 0, repeat: bool = False,
                 on_bad_record: str = "raise", grpo_scale_by_std: bool = True,
                 shard: tuple[int, int] | None = None, skip_batches: int = 0, batch_size: int = 1):
        if on_bad_record not in ("raise", "skip"):
            raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
        self.files = expand_paths(paths)
        self.tokenizer = tokenizer
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.seed = seed
        self.repeat = repeat
        self.on_bad_record = on_bad_record
        self.grpo_scale_by_std = grpo_scale_by_std
        self.shard = shard
        self.epoch = 0
        self.skip_batches = skip_batches
        self.batch_size = batch_size
        self.rank_world = _dist_rank() or (0, 1)

    def _reader(self) -> tuple[int, int]:
        """(index, count) of this reader among all DDP ranks x dataloader workers."""
        if self.shard is not None:
            return self.shard
        info = get_worker_info()
        if info is None:  # the rank's own process: the process group (if any) is visible here
            self.rank_world = _dist_rank() or self.rank_world
        rank, world = self.rank_world
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[BufferItem]:
        # Read the settings now, not at the first next(): a DataLoader may change them right after iter().
        index, count = self._reader()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batch b comes from worker b % workers: this worker's share of the batches already trained on.
        to_skip = max(0, (self.skip_batches - worker + workers - 1) // workers) * self.batch_size
        return self._stream(self.epoch, index, count, to_skip)

    def _stream(self, epoch: int, index: int, count: int, to_skip: int) -> Iterator[BufferItem]:
        while True:
            for item in self._epoch(epoch, index, count):
                if to_skip:
                    to_skip -= 1
                    continue
                yield item
            if not self.repeat:
                return
            epoch += 1

    # ------------------------------------------------------------------ one pass
    def _epoch(self, epoch: int, index: int, count: int) -> Iterator[BufferItem]:
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        files = list(self.files)
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(files)  # the same order in every reader
        pool: list[BufferItem] = []
        skipped = 0
        for unit, lines in enumerate(self._groups(files)):
            if unit % count != index:
                continue
            rollouts, bad = self._parse_group(lines)
            skipped += bad
            for rollout in rollouts:
                item = BufferItem(rollout, skipped)
                skipped = 0
                if not self.shuffle:
                    yield item
                    continue
                pool.append(item)
                if len(pool) >= self.shuffle_buffer:
                    j = rng.randrange(len(pool))
                    pool[j], pool[-1] = pool[-1], pool[j]
                    yield pool.pop()
        rng.shuffle(pool)
        yield from pool
        if skipped:
            log.warning("skipped %d bad record(s) at the end of the buffer that no later record reports", skipped)

    def _groups(self, files: list[Path]) -> Iterator[list[tuple[Path, int, bytes]]]:
        """Maximal runs of consecutive lines sharing a group id; lines without one are groups of their own."""
        current: list[tuple[Path, int, bytes]] = []
        current_id: str | None = None
        for path in files:
            try:
                for number, raw in _read_lines(path):
                    gid = peek_group_id(raw)
                    if current and (gid is None or gid != current_id):
                        yield current
                        current = []
                    current.append((path, number, raw))
                    current_id = gid
            except (OSError, EOFError) as err:  # e.g. a gzip file cut short by a crash
                if self.on_bad_record == "raise":
                    raise OSError(f"{path}: cannot read the file to the end ({err}); pass on_bad_record='skip' "
                                  "to keep the records before the damage") from err
                log.warning("%s: stopped reading at damaged data (%s)", path, err)
            if current:  # groups never span files
                yield current
                current, current_id = [], None

    def _parse_group(self, lines: list[tuple[Path, int, bytes]]) -> tuple[list[Rollout], int]:
        rollouts: list[Rollout] = []
        bad = 0
        for path, number, raw in lines:
            try:
                rollouts.append(parse_record(raw, self.tokenizer))
            except BadRecordError as err:
                located = err.located(str(path), number)
                if self.on_bad_record == "raise":
                    raise located from None
                log.warning("skipping bad record: %s", located)
                bad += 1
        missing = [r for r in rollouts if r.advantage is None]
        if missing:
            advantages = grpo_advantages([r.reward for r in rollouts], [r.group_id for r in rollouts],
                                         scale_by_std=self.grpo_scale_by_std)
            for rollout, advantage in zip(rollouts, advantages):
                if rollout.advantage is None:
                    rollout.advantage = advantage
        return rollouts, bad
