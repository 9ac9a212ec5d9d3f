"""Streaming offline rollout buffer: JSON-lines files read lazily, shuffled with a seeded buffer, sharded.

Records are cut into *groups*: maximal runs of consecutive lines with the same non-empty ``group_id`` (writers
emit a group's rollouts together). A group is the unit of sharding, so GRPO advantages and group mean rewards are
computed over the whole group even when workers and ranks split the stream; every record is read by exactly one
(rank, worker) per epoch. Only one group and the shuffle buffer are held in memory.

Damage: a bad line is one bad record (``on_bad_record``). A file that cannot be read to its end (a gzip file cut
short or corrupted, a non-gzip file named ``.gz``) keeps every line read whole before the damage and counts the
rest as one :class:`DamagedFileError`. A pass that yields no rollout at all raises :class:`EmptyStreamError`
instead of looping forever.
"""

from __future__ import annotations

import logging
import os
import random
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lit_echo.advantages import group_mean_rewards, grpo_advantages
from lit_echo.data.paths import find_files
from lit_echo.data.records import RecordParser, peek_group_id
from lit_echo.rollout import BadRecordError, Rollout

log = logging.getLogger(__name__)

_SUFFIXES = (".jsonl", ".jsonl.gz")
_CHUNK = 1 << 16
_BOM = b"\xef\xbb\xbf"


class DamagedFileError(OSError):
    """A buffer file that cannot be read to its end; the records up to ``last_good_line`` were read."""

    def __init__(self, path: str | os.PathLike, last_good_line: int, reason: str, hint: str = ""):
        self.path, self.last_good_line, self.reason = str(path), last_good_line, reason
        super().__init__(f"{path}: damaged after line {last_good_line} (the last line read whole): {reason}; the "
                         f"rest of the file cannot be read{hint}")


class EmptyStreamError(ValueError):
    """A pass over the buffer gave this reader no usable rollout (empty files, every record bad, or fewer groups
    than readers): an endless stream would otherwise spin forever."""


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Rollout files named by ``paths``: each a file, a directory (its ``*.jsonl`` / ``*.jsonl.gz``, recursively)
    or a glob. Sorted, so every worker and rank sees the same order."""
    return find_files(paths, _SUFFIXES, what="rollout files (.jsonl, .jsonl.gz)")


def check_rollout_paths(option: str, paths: str | os.PathLike | Sequence[str | os.PathLike] | None) -> None:
    """FileNotFoundError naming the configuration ``option`` (e.g. ``"data.train_path"``) unless ``paths`` names
    rollout files; a relative path's error says which working directory it was resolved against. None passes."""
    if paths is None:
        return
    try:
        expand_paths(paths)
    except FileNotFoundError as err:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        relative = any(not os.path.isabs(os.path.expanduser(str(p))) for p in items)
        note = f" (relative paths are resolved against the working directory {os.getcwd()})" if relative else ""
        raise FileNotFoundError(f"{option}: {err}{note}") from None


def _gzip_chunks(fh) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-member) gzip stream, yielded as they come in bounded pieces, so a
    file cut short or corrupted still gives everything before the damage before the error. An empty file gives
    nothing. (Deflate cannot always tell where damage starts: bytes decoded wrongly before the error is detected
    come out as lines that fail to parse, each a bad record.)"""
    decoder = zlib.decompressobj(wbits=31)
    member_started = False
    data = b""
    while True:
        if not data:
            data = fh.read(_CHUNK)
            if not data:
                if member_started and not decoder.eof:
                    rest = decoder.flush()
                    if rest:
                        yield rest
                    if not decoder.eof:
                        raise EOFError("compressed file ended before the end-of-stream marker was reached")
                return
        member_started = True
        out = decoder.decompress(data, _CHUNK)
        if out:
            yield out
        if decoder.eof:  # appended gzip members (a run that restarted and appended) follow
            data = decoder.unused_data
            decoder, member_started = zlib.decompressobj(wbits=31), False
        else:
            data = decoder.unconsumed_tail


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line, gzip by suffix; a UTF-8 byte-order mark at the
    start is dropped. Raises :class:`DamagedFileError` after the last line read whole when the file cannot be
    read to its end."""
    number = 0
    try:
        with open(path, "rb") as fh:
            chunks = _gzip_chunks(fh) if path.name.endswith(".gz") else iter(partial(fh.read, _CHUNK), b"")
            pending: list[bytes] = []  # pieces of the line being read (a line may span many chunks)
            for chunk in chunks:
                lines = chunk.split(b"\n")
                if len(lines) == 1:
                    pending.append(chunk)
                    continue
                lines[0] = b"".join(pending + [lines[0]])
                pending = [lines.pop()]
                for raw in lines:
                    number += 1
                    if number == 1 and raw.startswith(_BOM):
                        raw = raw[len(_BOM):]
                    if raw.strip():
                        yield number, raw
            tail = b"".join(pending)
            if number == 0 and tail.startswith(_BOM):
                tail = tail[len(_BOM):]
            if tail.strip():
                yield number + 1, tail
    except (OSError, EOFError, zlib.error) as err:
        raise DamagedFileError(path, number, f"{type(err).__name__}: {err}") from err


def _dist_rank() -> tuple[int, int] | None:
    """(rank, world size) of the initialised default process group, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


@dataclass
class BufferItem:
    """A rollout, how many bad records this reader skipped since the previous item (for logging), and the mean
    reward of the rollout's whole group (None when unknown; the collator then uses the group's rows in the
    batch)."""

    rollout: Rollout
    skipped: int = 0
    group_reward_mean: float | None = None


@dataclass
class _PassCounts:
    """What one reader saw in one pass over the files."""

    groups: int = 0  # groups in the files (every reader sees all of them)
    owned: int = 0  # groups this reader parses
    kept: int = 0  # rollouts it delivered


class _SkipLog:
    """Bad-record bookkeeping of one reader's stream: the first ``detailed`` problems are logged in full, later
    ones are counted and summarized at the end of a pass (at most once a minute); each damaged file is logged
    once. ``pending`` is attached to the next delivered item (``BufferItem.skipped``, logged as data/skipped)."""

    def __init__(self, detailed: int = 10, summary_every_s: float = 60.0):
        self.detailed = detailed
        self.summary_every_s = summary_every_s
        self.shown = 0
        self.pending = 0
        self.in_pass = 0
        self.last: str | None = None
        self.damaged_files: set[str] = set()
        self.last_summary = -float("inf")

    def bad_record(self, message: str) -> None:
        self.pending += 1
        self.in_pass += 1
        self.last = message
        if self.shown < self.detailed:
            self.shown += 1
            log.warning("skipping bad record: %s", message)
            if self.shown == self.detailed:
                log.warning("further bad records are counted (data/skipped) and summarized once per pass")

    def damaged_file(self, err: DamagedFileError) -> None:
        self.pending += 1
        self.in_pass += 1
        self.last = str(err)
        if err.path not in self.damaged_files:
            self.damaged_files.add(err.path)
            log.warning("skipping the damaged rest of a file: %s", err)

    def take(self) -> int:
        pending, self.pending = self.pending, 0
        return pending

    def end_pass(self) -> None:
        now = time.monotonic()
        if self.in_pass and self.shown >= self.detailed and now - self.last_summary >= self.summary_every_s:
            log.warning("skipped %d bad record(s) in a pass over the buffer; the last: %s", self.in_pass, self.last)
            self.last_summary = now
        self.in_pass = 0


class RolloutBuffer(IterableDataset):
    """Iterable over the rollouts of JSON-lines files (tokenized or messages records, see lit_echo.rollout).

    Args:
        paths: file, directory, glob, or a list of them.
        tokenizer: the model's tokenizer: renders messages records (body-only roles) and bounds token ids
            (``len(tokenizer)``) and fingerprints of tokenized records; may be None for tokenized-only buffers
            (ids are then only checked to be int64).
        shuffle: shuffle file order and records (seeded by ``seed`` and the epoch).
        shuffle_buffer: records held for shuffling (memory bound).
        seed: base seed.
        repeat: cycle epochs forever (step-based training; every rank keeps producing, so DDP never hangs on
            uneven shards); False gives one pass per iteration.
        on_bad_record: "raise" stops with a :class:`BadRecordError` naming file, line, field and expected form
            (a :class:`DamagedFileError` naming the file and its last good line for a damaged file); "skip" logs
            it (the first few in full, then a summary per pass) and counts it in ``BufferItem.skipped``.
        grpo_scale_by_std: GRPO (True) or Dr. GRPO (False) for records without an ``advantage``.
        shard: override (index, count) of this reader; default from DDP rank and dataloader worker.
        skip_batches, batch_size: resume support: the first ``skip_batches`` batches of ``batch_size`` items that a
            DataLoader over this buffer would deliver (workers deliver batches in turn) are read and dropped.

    A pass that gives this reader no rollout raises :class:`EmptyStreamError` when the stream repeats or this is
    the only reader (an endless stream would spin forever); a one-pass reader among several may own no group.

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
        self.parse = RecordParser(tokenizer)
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
        skips = _SkipLog()
        while True:
            for item in self._epoch(epoch, index, count, skips):
                if to_skip:
                    to_skip -= 1
                    continue
                yield item
            if not self.repeat:
                return
            epoch += 1

    # ------------------------------------------------------------------ one pass
    def _epoch(self, epoch: int, index: int, count: int, skips: _SkipLog) -> Iterator[BufferItem]:
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        files = list(self.files)
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(files)  # the same order in every reader
        pool: list[BufferItem] = []
        counts = _PassCounts()
        for unit, lines in enumerate(self._groups(files, skips, report_damage=index == 0)):
            counts.groups += 1
            if unit % count != index:
                continue
            counts.owned += 1
            for rollout, group_mean in self._parse_group(lines, skips):
                counts.kept += 1
                item = BufferItem(rollout, skips.take(), group_mean)
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
        skips.end_pass()
        if counts.kept == 0 and (self.repeat or count == 1):
            raise EmptyStreamError(self._empty_message(counts, index, count, skips))

    def _empty_message(self, counts: _PassCounts, index: int, count: int, skips: _SkipLog) -> str:
        files = ", ".join(map(str, self.files[:3])) + (f" and {len(self.files) - 3} more" if len(self.files) > 3
                                                       else "")
        if counts.groups == 0 and not skips.last:
            why = "the files hold no records"
        elif counts.owned == 0:
            why = (f"the files hold {counts.groups} group(s), fewer than the {count} readers (DDP ranks x "
                   f"dataloader workers), and this reader ({index}) owns none: use fewer num_workers or more data")
        else:
            why = (f"every record of this reader's {counts.owned} group(s) was bad (on_bad_record="
                   f"{self.on_bad_record!r}); the last problem: {skips.last}")
        return f"no usable rollout in a pass over {files}: {why}"

    def _groups(self, files: list[Path], skips: _SkipLog, report_damage: bool
                ) -> Iterator[list[tuple[Path, int, bytes]]]:
        """Maximal runs of consecutive lines sharing a group id; lines without one are groups of their own.

        A damaged file ends its last group at the last line read whole; in skip mode the damage is counted once
        (by reader 0, as every reader reads every file)."""
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
            except DamagedFileError as err:
                if self.on_bad_record == "raise":
                    raise DamagedFileError(path, err.last_good_line, err.reason,
                                           hint="; pass on_bad_record='skip' to keep the records before the "
                                                "damage") from err
                if report_damage:
                    skips.damaged_file(err)
            if current:  # groups never span files
                yield current
                current, current_id = [], None

    def _parse_group(self, lines: list[tuple[Path, int, bytes]], skips: _SkipLog
                     ) -> list[tuple[Rollout, float]]:
        """The group's good rollouts with their GRPO advantages (where a record has none) and the group's mean
        reward, both over the whole group."""
        rollouts: list[Rollout] = []
        for path, number, raw in lines:
            try:
                rollouts.append(self.parse(raw))
            except BadRecordError as err:
                located = err.located(str(path), number)
                if self.on_bad_record == "raise":
                    raise located from None
                skips.bad_record(str(located))
            except Exception as err:  # a failure the checks did not foresee: still one bad record, located
                located = BadRecordError("<record>", "a record the reader can process (this is a reader bug: "
                                         "please report it)", got=f"{type(err).__name__}: {err}",
                                         path=str(path), line=number)
                if self.on_bad_record == "raise":
                    raise located from err
                skips.bad_record(str(located))
        if not rollouts:
            return []
        rewards, groups = [r.reward for r in rollouts], [r.group_id for r in rollouts]
        missing = [r for r in rollouts if r.advantage is None]
        if missing:
            advantages = grpo_advantages(rewards, groups, scale_by_std=self.grpo_scale_by_std)
            for rollout, advantage in zip(rollouts, advantages):
                if rollout.advantage is None:
                    rollout.advantage = advantage
        return list(zip(rollouts, group_mean_rewards(rewards, groups)))
