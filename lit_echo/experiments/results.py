"""``results.csv``: one row per evaluation point (arm, training seed, online step), rewritten atomically; and
``tasks.csv``: per point, split and held-out task, the episodes played and won; and ``training.csv``: one row per
finished training run with its seconds, so the compute a grid cost survives being published and resumed.

The warm start is evaluated once, as arm ``warm_start``, seed 0, step 0; it is every arm's step 0. Each new row
rewrites the whole (small) file through a temporary file and ``os.replace``, so a kill leaves either the old or
the new file, never half a row, and a finished evaluation is never lost. ``tasks.csv`` is what the paired
intervals need (the same tasks before and after), small enough to commit with the results, so a grid resumed
elsewhere from published results still pairs its new points with the old ones.
"""

from __future__ import annotations

import csv
import fcntl
import math
import os
from pathlib import Path

from lit_echo.experiments.evaluation import METRIC_COLUMNS

WARM_START = "warm_start"
KEY_COLUMNS = ["arm", "seed", "step"]
COLUMNS = KEY_COLUMNS + METRIC_COLUMNS

Row = dict[str, float | int | str]


def _parse_number(value: str) -> float:
    return math.nan if value == "" else float(value)


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class _SharedCsv:
    """A small CSV file that several grid processes share: its rows are read at construction, and every change
    (:meth:`_rewrite`) holds an exclusive lock on ``path.lock``, re-reads the file, and writes it back whole through
    a temporary file and ``os.replace``, so no process drops another's rows and a kill never leaves half a row.

    A subclass gives ``columns``, :meth:`_parse` (one record to a row; a ValueError or TypeError there says what the
    line should hold) and optionally :meth:`_sort_key`.
    """

    columns: list[str]

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[Row] = self._read()

    def _parse(self, record: dict[str, str]) -> Row:
        raise NotImplementedError

    def _sort_key(self, row: Row):
        return 0  # keep the order rows were written in

    def _read(self) -> list[Row]:
        if not self.path.exists():
            return []
        rows: list[Row] = []
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != self.columns:
                raise ValueError(f"{self.path}: header {reader.fieldnames} is not this version's columns "
                                 f"{self.columns}; move the file away or use another --out directory")
            for line, record in enumerate(reader, start=2):
                try:
                    rows.append(self._parse(record))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{self.path}:{line}: {err}") from err
        return rows

    def _rewrite(self, keep, new_rows: list[Row]) -> None:
        """Under the lock: the file's current rows that ``keep`` accepts, plus ``new_rows``, written atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            rows = sorted([r for r in self._read() if keep(r)] + new_rows, key=self._sort_key)
            _write_atomically(self.path, self.columns, rows)
            self.rows = rows


class _PointsCsv(_SharedCsv):
    """A :class:`_SharedCsv` whose rows belong to evaluation points: columns ``arm``, ``seed`` and ``step``."""

    def has(self, arm: str, seed: int, step: int) -> bool:
        return any((r["arm"], r["seed"], r["step"]) == (arm, seed, step) for r in self.rows)

    def remove_run(self, arm: str, seed: int) -> None:
        """Drop every row of run ``arm`` seed ``seed`` (they belong to an earlier run of that name)."""
        if any((r["arm"], r["seed"]) == (arm, seed) for r in self._read()):
            self._rewrite(lambda r: (r["arm"], r["seed"]) != (arm, seed), [])

    def _replace_point(self, arm: str, seed: int, step: int, new_rows: list[Row]) -> None:
        """The rows of one point become ``new_rows`` (its earlier rows are dropped)."""
        self._rewrite(lambda r: (r["arm"], r["seed"], r["step"]) != (arm, seed, step), new_rows)


class ResultsFile(_PointsCsv):
    """``results.csv``: the metrics of each evaluation point; :meth:`add` replaces one point durably.

    Several grid processes may share one file (e.g. ``--arms mask`` and ``--arms echo`` side by side, each on
    one core), hence the lock-and-rewrite of :class:`_SharedCsv`.
    """

    columns = COLUMNS

    def _parse(self, record: dict[str, str]) -> Row:
        try:
            row: Row = {"arm": record["arm"], "seed": int(record["seed"]), "step": int(record["step"])}
            row.update({name: _parse_number(record[name]) for name in METRIC_COLUMNS})
        except (TypeError, ValueError) as err:
            raise ValueError(f"expected numbers in columns seed, step and the metrics ({err})") from err
        return row

    def _sort_key(self, row: Row):
        return row["arm"] != WARM_START, str(row["arm"]), row["seed"], row["step"]

    def add(self, arm: str, seed: int, step: int, metrics: dict[str, float]) -> None:
        missing = [name for name in METRIC_COLUMNS if name not in metrics]
        if missing:
            raise KeyError(f"evaluation result lacks columns {missing}")
        row = {"arm": arm, "seed": seed, "step": step, **{k: metrics[k] for k in METRIC_COLUMNS}}
        self._replace_point(arm, seed, step, [row])


def _write_atomically(path: Path, columns: list[str], rows: list[Row]) -> None:
    """``rows`` as CSV to ``path`` through a temporary file and ``os.replace`` (the caller holds the lock)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row[name]) for name in columns])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


TASK_COLUMNS = ["arm", "seed", "step", "split", "task", "wins", "episodes"]


class TasksFile(_PointsCsv):
    """``tasks.csv``: per evaluation point and split, each task's episodes won and played (:meth:`rates`);
    :meth:`add` replaces one point's tasks."""

    columns = TASK_COLUMNS

    def _parse(self, record: dict[str, str]) -> Row:
        try:
            return {"arm": record["arm"], "split": record["split"],
                    **{k: int(record[k]) for k in ("seed", "step", "task", "wins", "episodes")}}
        except (TypeError, ValueError) as err:
            raise ValueError(f"expected integers in seed, step, task, wins, episodes ({err})") from err

    def _sort_key(self, row: Row):
        return row["arm"] != WARM_START, str(row["arm"]), row["seed"], row["step"], str(row["split"]), row["task"]

    def rates(self, arm: str, seed: int, step: int, split: str) -> dict[int, float]:
        """Success rate of each task of one point and split ({} when the point is not here)."""
        return {int(r["task"]): r["wins"] / r["episodes"] for r in self.rows
                if (r["arm"], r["seed"], r["step"], r["split"]) == (arm, seed, step, split) and r["episodes"]}

    def add(self, arm: str, seed: int, step: int, tasks: dict[str, dict[int, tuple[int, int]]]) -> None:
        """``tasks``: split -> task seed -> (wins, episodes) of one point (its earlier rows are replaced)."""
        new = [{"arm": arm, "seed": seed, "step": step, "split": split, "task": task, "wins": wins,
                "episodes": episodes}
               for split, per_task in tasks.items() for task, (wins, episodes) in sorted(per_task.items())]
        self._replace_point(arm, seed, step, new)


TRAINING_COLUMNS = ["run", "seconds"]


class TrainingFile(_SharedCsv):
    """``training.csv``: one row per finished training (warm start or online run) and the seconds it took.

    A ledger of compute spent, not of results: a run trained again (a lost directory, a changed recipe) adds a
    second row, because that time was spent too. Published with the results and read back by ``--resume-from``,
    so the cost of a grid trained over several sittings and machines is not lost with their run directories.
    """

    columns = TRAINING_COLUMNS

    def _parse(self, record: dict[str, str]) -> Row:
        try:
            seconds = float(record["seconds"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"column seconds: expected a number of seconds ({err})") from err
        if not record["run"] or not seconds >= 0:
            raise ValueError(f"expected a run name and seconds >= 0, got {record['run']!r}, {record['seconds']!r}")
        return {"run": record["run"], "seconds": seconds}

    @property
    def seconds(self) -> float:
        return sum(float(r["seconds"]) for r in self.rows)

    def has(self, run: str, seconds: float) -> bool:
        return any(r["run"] == run and abs(float(r["seconds"]) - seconds) < 0.05 for r in self.rows)

    def add(self, run: str, seconds: float) -> None:
        """Append one finished training (under the lock, re-reading the file: grids may share it)."""
        self._rewrite(lambda r: True, [{"run": run, "seconds": round(float(seconds), 1)}])
