"""Does online ECHO make a better agent than action masking? Five arms x training seeds on ShellWorld, one command.

    python -m lit_echo.experiments.compare                    # the full grid (resumable; results in runs/compare)
    python -m lit_echo.experiments.compare --quick            # the whole pipeline on the tiny model, ~1 min
    python -m lit_echo.experiments.compare --arms mask --seeds 0   # only part of the grid this sitting
    python -m lit_echo.experiments.compare --report-only --publish results   # the report of the rows so far
    python -m lit_echo.experiments.compare --grid round2 --resume-from results/round2 --publish results/round2
                                                              # the second round, continued from its published points

Stages, each skipped when already done, so the grid can be spread over several sittings (a kill loses at most
the steps since the run's last checkpoint, or the evaluation in progress):

1. warm start (``OUT/warm_start``): SmolLM2 + LoRA on scripted-expert rollouts, shared by every run;
   ``done.json`` marks it finished (and ``OUT/training.csv`` gets a row with its seconds), and it is evaluated
   once as every arm's step 0;
2. per training seed, per arm: an online ``lit-echo fit`` in its own process (``OUT/runs/ARM-sSEED``, config,
   log, TensorBoard, rollouts, an adapter every ``eval_every`` steps, a checkpoint every few steps;
   ``done.json`` when finished; an unfinished run continues from its newest checkpoint, bit-identical to an
   uninterrupted run, or starts over if it has none), then every exported adapter is evaluated
   (``OUT/evals/ARM-sSEED/step-N``: the held-out episodes) and its row appended to ``OUT/results.csv``;
3. report: ``OUT/results.png`` and ``OUT/results.md`` from all rows so far (``--publish DIR`` copies them there
   with ``results.csv``, ``tasks.csv`` (per-task successes of every point, for the paired intervals),
   ``training.csv`` (seconds of every training, for the cost line) and ``spec.json``, e.g. ``results/``).

Sittings on other machines: ``--resume-from DIR`` starts an empty ``--out`` from the points published in DIR. A
run whose points are all in ``results.csv`` and ``tasks.csv`` is finished, with or without its run directory; the
warm start is trained again (deterministic: same seed, same data, the same evaluation to the last digit when this
was checked on round 2) only if a run still has to train; that retrain is a row of ``training.csv`` like any.

A run or evaluation that fails is reported at the end (exit status 1) and retried by the next invocation; the
others go on. See :mod:`lit_echo.experiments.grid` for the arms and how the sizes were chosen.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import logging
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lit_echo.experiments.evaluation import METRICS_FILE, task_counts, task_success_rates
from lit_echo.experiments.grid import (
    CHECKPOINTS,
    EVAL_SPLITS,
    FULL,
    QUICK,
    ROUND2,
    Arm,
    GridSpec,
    arms,
    online_config,
    warm_start_config,
)
from lit_echo.experiments.intervals import paired_difference_interval
from lit_echo.experiments.report import markdown_table, plot
from lit_echo.experiments.results import WARM_START, ResultsFile, TasksFile, TrainingFile

log = logging.getLogger("lit_echo.experiments")

DONE = "done.json"
PIECES = "pieces.json"
OUTPUTS = ("results.csv", "results.png", "results.md")
# What --publish copies; --resume-from reads the data files back.
PUBLISHED = (*OUTPUTS, "tasks.csv", "training.csv", "spec.json")
GRIDS = {"first": FULL, "round2": ROUND2}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StageFailed(RuntimeError):
    """A training run or an evaluation failed (the grid goes on without it)."""


@dataclass
class Summary:
    """What one invocation did; ``failures`` name the stages to retry."""

    trained: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to kill it when the grid process dies (even by SIGKILL), so a killed
    grid leaves no orphan run writing into a directory the next invocation starts over."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a killed grid may leave its current run to finish alone
        pass


def _run_logged(module_args: list[str], log_path: Path, what: str) -> None:
    """``python -m MODULE ARGS`` in a fresh process, its output to ``log_path``; :class:`StageFailed` (naming
    ``what``, with the log's tail) when it exits non-zero."""
    with open(log_path, "w") as out:
        process = subprocess.run([sys.executable, "-m", *module_args], check=False, stdout=out,
                                 stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise StageFailed(f"{what} exited with status {process.returncode} (log: {log_path})\n{tail}")


def fit(config: dict, root: Path) -> float:
    """``lit-echo fit`` over ``config`` in a fresh process (its own memory, a crash stays there); the seconds
    the run took, over all its invocations.

    ``root/done.json`` marks a finished run. An unfinished ``root`` (a killed sitting) continues from its newest
    loadable checkpoint (``root/checkpoints``; the resumed run is bit-identical to an uninterrupted one, see
    :mod:`lit_echo.online.resume`) if it has one of the same recipe; otherwise it is deleted and the run starts
    over (no half-trained adapters are kept or evaluated). A finished run's checkpoints are deleted: its
    exported adapters are what the grid keeps. ``root/pieces.json`` keeps the seconds of each invocation (an
    invocation that was killed counts until its log was last written)."""
    checkpoint = _resumable(root, config)
    if checkpoint is None:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        extra, log_path = [], root / "fit.log"
    else:
        log.info("%s: continuing from %s", root.name, checkpoint.name)
        extra, log_path = ["--ckpt_path", str(checkpoint)], root / f"fit-from-{checkpoint.stem}.log"
    pieces = _pieces(root)
    pieces.append({"log": log_path.name, "started": time.time(), "seconds": None})
    (root / PIECES).write_text(json.dumps(pieces) + "\n")
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    _run_logged(["lit_echo.cli", "fit", "--config", str(config_path), *extra], log_path, f"{root}: lit-echo fit")
    pieces[-1]["seconds"] = round(time.perf_counter() - started, 1)
    (root / PIECES).write_text(json.dumps(pieces) + "\n")
    seconds = round(sum(piece["seconds"] for piece in pieces), 1)
    shutil.rmtree(root / CHECKPOINTS, ignore_errors=True)
    (root / DONE).write_text(json.dumps({"seconds": seconds, "invocations": len(pieces)}) + "\n")
    return seconds


def _pieces(root: Path) -> list[dict]:
    """The earlier invocations of the unfinished run in ``root`` with their seconds; one that was killed (no
    seconds) counts from its start to the last write of its log."""
    path = root / PIECES
    if not path.is_file():
        return []
    pieces = json.loads(path.read_text())
    for piece in pieces:
        if piece["seconds"] is None:
            log_file = root / piece["log"]
            end = log_file.stat().st_mtime if log_file.exists() else piece["started"]
            piece["seconds"] = round(max(0.0, end - piece["started"]), 1)
    return pieces


def _resumable(root: Path, config: dict) -> Path | None:
    """The newest loadable checkpoint of an unfinished run in ``root`` written with ``config``'s ``model``
    settings; None when there is none."""
    if (root / DONE).exists() or not (root / "config.yaml").is_file() or not any((root / CHECKPOINTS).glob("*.ckpt")):
        return None
    try:
        _check_same_recipe(root, config)
    except ValueError as err:
        log.warning("%s; not continued: trained again from the start", err)
        return None
    return newest_loadable_checkpoint(root / CHECKPOINTS)


def newest_loadable_checkpoint(directory: Path) -> Path | None:
    """The checkpoint (``*step=N.ckpt``) of the highest step in ``directory`` that loads (a kill may have cut the
    newest one short); None when none does."""
    import torch

    for path in sorted(directory.glob("*.ckpt"), key=_checkpoint_step, reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=False)
            return path
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            log.warning("%s does not load (%s: %s); trying an older checkpoint", path, type(err).__name__, err)
    return None


def _checkpoint_step(path: Path) -> int:
    """The step of a checkpoint named ``step=N.ckpt`` (ModelCheckpoint's ``filename="{step}"``); -1 otherwise."""
    _, _, step = path.stem.rpartition("step=")
    return int(step) if step.isdigit() else -1


def _check_same_recipe(root: Path, config: dict) -> None:
    """Raise when the finished run in ``root`` was trained with other ``model`` settings than ``config``'s
    (paths aside: the grid directory may have moved)."""
    found = yaml.safe_load((root / "config.yaml").read_text()).get("model", {})
    wanted = config.get("model", {})
    changed = sorted(k for k in set(found) | set(wanted) if k != "init_adapter" and found.get(k) != wanted.get(k))
    if changed:
        raise ValueError(f"{root}: this finished run was trained with other settings than this version's recipe "
                         f"(model.{', model.'.join(changed)}: "
                         f"{', '.join(f'{found.get(k)!r} now {wanted.get(k)!r}' for k in changed)}); delete the "
                         "directory to train it again (its rows in results.csv are replaced)")


def evaluate(spec: GridSpec, adapter: Path, point_dir: Path, expert_buffer: Path) -> dict[str, float]:
    """:func:`~lit_echo.experiments.evaluation.evaluate_point` in a fresh process; its metrics.

    The grid process then holds no policy between points: two grids side by side keep their memory to their
    training runs (an in-process evaluation left ~4 GB resident in each grid, and with two ~8 GB training runs
    that exhausted a 24 GB machine). Its output goes to ``point_dir`` + ``.log``."""
    log_path = point_dir.with_name(point_dir.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _run_logged(["lit_echo.experiments.evaluation", json.dumps(spec.to_json()), str(adapter), str(point_dir),
                 str(expert_buffer)], log_path, f"{point_dir}: evaluation")
    return json.loads((point_dir / METRICS_FILE).read_text())


class Grid:
    """The comparison under ``out`` for ``spec``; ``data_dir`` holds the ShellWorld expert buffers.

    ``report_only``: the grid only writes its report, so a directory trained in another precision than this
    machine's is accepted (its own precision is kept): reading published points needs no comparable hardware.
    """

    def __init__(self, spec: GridSpec, out: Path, data_dir: Path, *, report_only: bool = False):
        self.spec = spec
        self.out = out
        self.data_dir = data_dir
        self.arms = arms(spec.online_steps, spec.arm_set)
        for name in ("expert-train.jsonl.gz", "expert-heldout_trees.jsonl.gz"):
            if not (data_dir / name).is_file():
                raise FileNotFoundError(f"{data_dir / name}: missing; --data-dir must hold the ShellWorld expert "
                                        "buffers (data/shellworld in the repository)")
        self._check_spec(report_only)
        self.results = ResultsFile(out / "results.csv")
        self.tasks = TasksFile(out / "tasks.csv")
        self.training = TrainingFile(out / "training.csv")
        self.summary = Summary()

    def _check_spec(self, report_only: bool) -> None:
        path = self.out / "spec.json"
        wanted = self.spec.to_json()
        if path.exists():
            # Fields added since a directory was made take their defaults (the sizes it ran with).
            defaults = {f.name: f.default for f in dataclasses.fields(GridSpec)
                        if f.default is not dataclasses.MISSING}
            found = {**defaults, **json.loads(path.read_text())}
            wanted = json.loads(json.dumps(wanted))  # as JSON holds it (tuples as lists)
            if found != wanted:
                changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                if changed == ["precision"] and report_only:
                    self.spec = dataclasses.replace(self.spec, precision=found["precision"])
                    return
                if changed == ["precision"]:
                    raise ValueError(
                        f"{path}: this grid was trained with precision {found['precision']}, and this machine "
                        f"resolves precision 'auto' to {wanted['precision']} (lit_echo.precision: bf16 only where "
                        "the hardware computes it natively, e.g. a CPU with avx512_bf16; elsewhere it is several "
                        "times slower than float32). Runs in another precision are not comparable with its points: "
                        f"continue it on a machine that runs {found['precision']}, or start a grid of its own "
                        "in another --out directory")
                raise ValueError(f"{path}: this directory holds a grid with other sizes (differs in {changed}); "
                                 "use another --out directory, or delete it to start over")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(wanted, indent=2) + "\n")

    @property
    def warm_start_dir(self) -> Path:
        return self.out / "warm_start"

    def _train(self, name: str, config: dict, root: Path) -> bool:
        """Train unless finished; False when it failed. A finished run trained with other ``model`` settings
        than this version's recipe raises (its results would be reported under the wrong recipe)."""
        if (root / DONE).exists():
            _check_same_recipe(root, config)
            return True
        log.info("training %s", name)
        try:
            seconds = fit(config, root)
        except StageFailed as err:
            log.error("%s", err)
            self.summary.failures.append(f"train {name}")
            return False
        log.info("trained %s in %.0f s", name, seconds)
        self.training.add(name, seconds)
        self.summary.trained.append(name)
        return True

    def _evaluate(self, arm: str, seed: int, step: int, adapter: Path, point_dir: Path) -> None:
        if self.results.has(arm, seed, step):
            return
        name = f"{arm} seed {seed} step {step}"
        log.info("evaluating %s", name)
        try:
            metrics = evaluate(self.spec, adapter, point_dir, self.data_dir / "expert-heldout_trees.jsonl.gz")
        except Exception as err:  # one failing evaluation must not stop the grid; it is retried next time
            log.exception("evaluation of %s failed", name)
            self.summary.failures.append(f"evaluate {name}: {type(err).__name__}: {err}")
            return
        self._record_tasks(arm, seed, step, point_dir)  # before the row: a row always has its tasks
        self.results.add(arm, seed, step, metrics)
        self.summary.evaluated.append(name)

    def _record_tasks(self, arm: str, seed: int, step: int, point_dir: Path) -> None:
        self.tasks.add(arm, seed, step, {split: task_counts(point_dir / f"{split}.jsonl") for split in EVAL_SPLITS})

    def _backfill_tasks(self) -> None:
        """Per-task successes of rows evaluated before ``tasks.csv`` existed, from their episode files."""
        for row in self.results.rows:
            arm, seed, step = str(row["arm"]), int(row["seed"]), int(row["step"])
            point_dir = self._point_dir(arm, seed, step)
            if not self.tasks.has(arm, seed, step) and (point_dir / f"{EVAL_SPLITS[0]}.jsonl").is_file():
                self._record_tasks(arm, seed, step, point_dir)

    def _backfill_training(self) -> None:
        """Ledger rows for finished runs here that lack one (trained by a version without ``training.csv``)."""
        for done in sorted(self.out.glob("**/" + DONE)):
            name = done.parent.name  # "warm_start" or "<arm>-s<seed>"
            seconds = float(json.loads(done.read_text())["seconds"])
            if not self.training.has(name, seconds):
                self.training.add(name, seconds)

    def _point_dir(self, arm: str, seed: int, step: int) -> Path:
        return self.out / "evals" / (WARM_START if arm == WARM_START else f"{arm}-s{seed}") / f"step-{step}"

    def _evaluated(self, arm: str, seed: int, step: int) -> bool:
        return self.results.has(arm, seed, step) and self.tasks.has(arm, seed, step)

    def finished(self, arm: Arm, seed: int) -> bool:
        """Every point of the run is in ``results.csv`` and ``tasks.csv`` (here or in an earlier sitting)."""
        return all(self._evaluated(arm.name, seed, step) for step in self.spec.eval_steps())

    def warm_start(self) -> bool:
        root = self.warm_start_dir
        if not self._train(WARM_START, warm_start_config(self.spec, root, self.data_dir), root):
            return False
        self._evaluate(WARM_START, 0, 0, root / "adapter", self._point_dir(WARM_START, 0, 0))
        return True

    def online_run(self, arm: Arm, seed: int) -> None:
        name = f"{arm.name}-s{seed}"
        root = self.out / "runs" / name
        config = online_config(self.spec, arm, seed, root, self.warm_start_dir / "adapter")
        if not (root / DONE).exists() and self.finished(arm, seed):
            log.info("%s: every point evaluated in an earlier sitting; not trained again", name)
            return
        if not (root / DONE).exists():  # (re)trained from scratch: rows of an earlier run of this name go
            self.results.remove_run(arm.name, seed)
            self.tasks.remove_run(arm.name, seed)
        if not self._train(name, config, root):
            return
        for step in self.spec.eval_steps():
            self._evaluate(arm.name, seed, step, root / "adapters" / f"step-{step}",
                           self._point_dir(arm.name, seed, step))

    def report(self, publish: Path | None = None) -> None:
        spec = self.spec
        title = (f"ShellWorld, {spec.model}: {spec.online_steps} online steps x "
                 f"{spec.groups_per_step * spec.group_size} rollouts from a {spec.warm_start_steps}-step warm start; "
                 f"{len(spec.seeds)} training seed(s)")
        self._backfill_tasks()
        self._backfill_training()
        plot(self.results.rows, self.arms, self.out / "results.png", title)
        (self.out / "results.md").write_text(self._table_text(title))
        if publish is not None:
            publish.mkdir(parents=True, exist_ok=True)
            for name in PUBLISHED:
                if (self.out / name).exists():
                    shutil.copyfile(self.out / name, publish / name)

    def _table_text(self, title: str) -> str:
        train_seconds = self.training.seconds
        eval_seconds = sum(float(r["eval_seconds"]) for r in self.results.rows)
        spec = self.spec
        return (f"{title}.\n\n"
                "Last evaluated step of each arm (never a chosen checkpoint): mean ± standard deviation over "
                "training seeds; for success, [95% interval of that mean from the evaluation noise: tasks "
                "resampled by bootstrap in each run]. Per point and split: "
                f"{spec.eval_tasks} tasks x {spec.eval_samples} episodes at temperature {spec.temperature}.\n\n"
                + markdown_table(self.results.rows, self.arms)
                + self._paired_text()
                + "\nCompute spent on this grid over all its sittings (one core each, runs trained again "
                  f"included; the trainings are in `training.csv`): training {train_seconds / 60:.1f} min, "
                  f"evaluation of the points above {eval_seconds / 60:.1f} min.\n")

    def _task_rates(self, arm: str, seed: int, step: int, split: str) -> dict[int, float]:
        """Per-task success of one evaluation point: from ``tasks.csv``, else the episodes kept under ``evals/``."""
        return (self.tasks.rates(arm, seed, step, split)
                or task_success_rates(self._point_dir(arm, seed, step) / f"{split}.jsonl"))

    def _paired_text(self) -> str:
        """Success changes at the last step on the same held-out tasks: per arm (mean over its training seeds)
        against the warm start and against action masking, then per run against the warm start; intervals from
        a paired bootstrap over tasks (and over training seeds where a side has several)."""
        last = self.spec.online_steps
        splits = (("heldout_trees", "unseen trees"), ("heldout_tasks", "unseen task types"))
        seeds_of = {arm.name: sorted({int(r["seed"]) for r in self.results.rows
                                      if r["arm"] == arm.name and int(r["step"]) == last}) for arm in self.arms}

        @functools.cache  # each evaluation file read once per report
        def point_rates(arm: str, seed: int, split: str) -> dict[int, float]:
            return self._task_rates(arm, seed, last if arm != WARM_START else 0, split)

        def rates(arm: str, seeds: list[int], split: str) -> list[dict[int, float]]:
            return [point_rates(arm, seed, split) for seed in seeds]

        def change(after: list[dict[int, float]], before: list[dict[int, float]]) -> str:
            tasks = sorted(set.intersection(*(set(r) for r in after + before)))
            if not tasks:
                return ""
            diff, low, high = paired_difference_interval([[r[t] for t in tasks] for r in before],
                                                         [[r[t] for t in tasks] for r in after])
            return f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"

        arm_lines, run_lines = [], []
        for arm in self.arms:
            seeds = seeds_of[arm.name]
            if not seeds:
                continue
            cells = []
            for split, _ in splits:
                after, start = rates(arm.name, seeds, split), rates(WARM_START, [0], split)
                cells.append(change(after, start))
            for split, _ in splits:
                masking = seeds_of["mask"]
                cells.append("" if arm.name == "mask" or not masking
                             else change(rates(arm.name, seeds, split), rates("mask", masking, split)))
            arm_lines.append(f"| {arm.name} | {len(seeds)} | " + " | ".join(cells) + " |")
            for seed in seeds:
                parts = [f"{label} {change(rates(arm.name, [seed], split), rates(WARM_START, [0], split))}"
                         for split, label in splits]
                run_lines.append(f"- {arm.name}, seed {seed}, step {last}: " + "; ".join(parts))
        if not arm_lines:
            return ""
        return (f"\nSuccess change at step {last} in points, on the same held-out tasks: mean over each arm's "
                "training seeds, [95% interval of a bootstrap that resamples tasks in pairs and, where a side has "
                "several, training seeds]:\n\n"
                "| arm | runs | vs warm start, unseen trees | vs warm start, unseen task types "
                "| vs masking, unseen trees | vs masking, unseen task types |\n"
                "|---|---|---:|---:|---:|---:|\n" + "\n".join(arm_lines) + "\n"
                "\nPer run, against the warm start (points; tasks resampled in pairs):\n\n"
                + "\n".join(run_lines) + "\n")

    def run(self, arm_names: list[str] | None = None, seeds: list[int] | None = None,
            publish: Path | None = None) -> Summary:
        retired = [a for a in self.arms if a.retired and arm_names is not None and a.name in arm_names]
        if retired:
            raise ValueError(f"arm {retired[0].name} is retired: it {retired[0].retired}")
        selected = [a for a in self.arms if (arm_names is None or a.name in arm_names) and not a.retired]
        runs = [(arm, seed) for seed in (self.spec.seeds if seeds is None else seeds) for arm in selected]
        to_train = [(arm, seed) for arm, seed in runs
                    if not (self.out / "runs" / f"{arm.name}-s{seed}" / DONE).exists() and not self.finished(arm, seed)]
        if (not to_train and self._evaluated(WARM_START, 0, 0)) or self.warm_start():
            for arm, seed in runs:
                self.online_run(arm, seed)
        self.report(publish)
        return self.summary


def _resume_from(published: Path, out: Path) -> None:
    """Copy the data files of ``published`` into ``out`` unless ``out`` already holds results."""
    if not (published / "results.csv").is_file():
        raise SystemExit(f"error: --resume-from {published}: no results.csv there (a directory --publish wrote)")
    if (out / "results.csv").exists():
        log.info("--resume-from %s: %s already holds results; using those", published, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in ("spec.json", "results.csv", "tasks.csv", "training.csv"):
        if (published / name).is_file():
            shutil.copyfile(published / name, out / name)
    log.info("--resume-from %s: %s starts from its points", published, out)


def _names(text: str, known: list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--{what}: unknown {unknown}; expected a comma-separated subset of {known}")
    return names


def main(argv: list[str] | None = None) -> Summary:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the tiny random model and tiny sizes: the pipeline in about a minute (not learning)")
    parser.add_argument("--grid", default="first", choices=sorted(GRIDS),
                        help="first: 16 online steps, five arms; round2: 64 steps, masking / ECHO 0.01 / ECHO 0.005 "
                             "/ PaW / ECHO 0.01 with an entropy guard (lit_echo.experiments.grid)")
    parser.add_argument("--out", default=None,
                        help="grid directory (default: runs/compare, runs/compare-round2; --quick: a new temporary "
                             "directory)")
    parser.add_argument("--resume-from", default=None,
                        help="a directory of published points (--publish): an --out without results starts from its "
                             "results.csv, tasks.csv and spec.json")
    parser.add_argument("--data-dir", default="data/shellworld", help="ShellWorld expert buffers")
    parser.add_argument("--arms", default=None,
                        help="comma-separated arms to run now (default: all that are not retired)")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds to run now (default: all)")
    parser.add_argument("--publish", default=None,
                        help="also copy results.csv, results.png, results.md to this directory (e.g. results)")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing: write the report from the rows so far (safe while other "
                             "grid processes run on the same --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    spec = QUICK if args.quick else GRIDS[args.grid]
    if args.out is not None:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="lit-echo-compare-"))
    else:
        out = Path("runs/compare" if args.grid == "first" else f"runs/compare-{args.grid}")
    if args.resume_from is not None:
        _resume_from(Path(args.resume_from), out)
    try:
        grid = Grid(spec, out.resolve(), Path(args.data_dir).resolve(), report_only=args.report_only)
    except (ValueError, FileNotFoundError) as err:  # another grid's directory, missing buffers: say it, no trace
        raise SystemExit(f"error: {err}") from None
    arm_names = None if args.arms is None else _names(args.arms, [a.name for a in grid.arms], "arms")
    seeds = None if args.seeds is None else [int(s) for s in _names(args.seeds, [str(s) for s in spec.seeds],
                                                                       "seeds")]
    started = time.perf_counter()
    publish = None if args.publish is None else Path(args.publish)
    if args.report_only:
        grid.report(publish)
        print(f"{out}: results.png and results.md written from {len(grid.results.rows)} row(s)")
        return grid.summary
    try:
        summary = grid.run(arm_names, seeds, publish)
    except ValueError as err:  # a finished run of another recipe: nothing to retry until the user decides
        raise SystemExit(f"error: {err}") from None
    print(f"{out}: trained {len(summary.trained)} run(s), evaluated {len(summary.evaluated)} point(s) in "
          f"{time.perf_counter() - started:.0f} s; results.csv, results.png, results.md written")
    if summary.failures:
        print("failed (retried by the next invocation):\n  " + "\n  ".join(summary.failures), file=sys.stderr)
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
