"""The comparison grid: intervals, the results file, the report, and the whole --quick pipeline (resumable)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lit_echo.experiments.evaluation import METRIC_COLUMNS, task_counts, task_success_rates
from lit_echo.experiments.grid import FULL, QUICK, ROUND2, arms, online_config
from lit_echo.experiments.intervals import (
    interval_of_mean,
    paired_difference_interval,
    task_bootstrap_interval,
    wilson_interval,
)
from lit_echo.experiments.report import markdown_table, series
from lit_echo.experiments.results import COLUMNS, WARM_START, ResultsFile, TasksFile, TrainingFile

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2), rel=1e-6)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high) and 0.23 < low < 0.24
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_task_bootstrap_is_wider_than_wilson_when_tasks_are_all_or_nothing():
    # 10 tasks x 4 episodes; each task is solved always or never: 40 episodes but only 10 independent draws.
    successes, trials = [4, 0] * 5, [4] * 10
    low, high = task_bootstrap_interval(successes, trials)
    w_low, w_high = wilson_interval(20, 40)
    assert low < 0.5 < high
    assert high - low > 1.4 * (w_high - w_low)
    assert task_bootstrap_interval([0, 0, 0], [4, 4, 4]) == (0.0, 0.0)
    assert task_bootstrap_interval([3], [4]) == wilson_interval(3, 4)


def test_paired_difference_resolves_a_shift_the_unpaired_intervals_cannot():
    """Tasks of very different difficulty, every one 10 points better after: the paired interval is exactly the
    shift, while the two points' own task-bootstrap intervals overlap widely."""
    before = [0.0, 0.1, 0.5, 0.9, 0.0, 0.4, 0.8, 0.2] * 5
    after = [b + 0.1 for b in before]
    diff, low, high = paired_difference_interval(before, after)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    own_before = task_bootstrap_interval([round(10 * b) for b in before], [10] * len(before))
    own_after = task_bootstrap_interval([round(10 * a) for a in after], [10] * len(after))
    assert own_after[0] < own_before[1]  # unpaired: the intervals overlap
    noisy = paired_difference_interval([0, 1, 0, 1], [1, 0, 0, 1])
    assert noisy[1] < 0 < noisy[2] and noisy[0] == 0
    with pytest.raises(ValueError):
        paired_difference_interval([0.1], [0.1, 0.2])


def test_paired_difference_over_several_runs_adds_the_spread_between_runs():
    """Three training runs per side ([runs, tasks]): the estimate is the difference of the means over runs and
    tasks, and resampling runs widens the interval when the runs disagree, not when they agree."""
    base = np.array([0.0, 0.1, 0.5, 0.9, 0.0, 0.4, 0.8, 0.2] * 5)  # [N]
    start = base[None, :]  # [1, N]: one warm start
    agreeing = np.stack([base + 0.1] * 3)  # [3, N]
    diff, low, high = paired_difference_interval(start, agreeing)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    spread = np.stack([base, base + 0.1, base + 0.2])  # same mean shift, runs disagree
    diff, low, high = paired_difference_interval(start, spread)
    assert diff == pytest.approx(0.1)
    assert low < 0.05 and high > 0.15
    arm_a = np.stack([base + 0.1, base + 0.2])  # [2, N] against [3, N]: shapes may differ in runs only
    assert paired_difference_interval(spread, arm_a)[0] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference_interval(start, np.stack([base[:-1]] * 3))


def test_task_success_rates_read_an_evaluation_file(tmp_path):
    path = tmp_path / "heldout_trees.jsonl"
    lines = [{"metadata": {"env_seed": seed, "success": ok}} for seed, ok in [(3, True), (3, False), (5, False),
                                                                               (5, False), (7, True)]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert task_success_rates(path) == {3: 0.5, 5: 0.0, 7: 1.0}
    assert task_counts(path) == {3: (1, 2), 5: (0, 2), 7: (1, 1)}
    assert task_success_rates(tmp_path / "missing.jsonl") == {}


def test_tasks_file_round_trip_replaces_a_point_and_drops_a_run(tmp_path):
    path = tmp_path / "tasks.csv"
    tasks = TasksFile(path)
    tasks.add(WARM_START, 0, 0, {"heldout_trees": {3: (1, 2), 5: (0, 2)}, "heldout_tasks": {1: (2, 2)}})
    tasks.add("mask", 0, 16, {"heldout_trees": {3: (2, 2), 5: (1, 2)}, "heldout_tasks": {1: (0, 2)}})
    TasksFile(path).add("mask", 0, 16, {"heldout_trees": {3: (0, 2), 5: (1, 2)}, "heldout_tasks": {1: (1, 2)}})
    again = TasksFile(path)
    assert again.rates("mask", 0, 16, "heldout_trees") == {3: 0.0, 5: 0.5}
    assert again.rates(WARM_START, 0, 0, "heldout_tasks") == {1: 1.0}
    assert again.rates("mask", 1, 16, "heldout_trees") == {} and len(again.rows) == 6
    again.remove_run("mask", 0)
    assert not TasksFile(path).has("mask", 0, 16) and TasksFile(path).has(WARM_START, 0, 0)
    path.write_text("arm,seed,step,split,task,wins,episodes\nmask,0,16,heldout_trees,3,one,2\n")
    with pytest.raises(ValueError, match=r"tasks\.csv:2: expected integers"):
        TasksFile(path)


def test_training_file_keeps_every_training_and_names_a_bad_line(tmp_path):
    path = tmp_path / "training.csv"
    TrainingFile(path).add(WARM_START, 382.44)
    TrainingFile(path).add("mask-s0", 4021.4)
    TrainingFile(path).add(WARM_START, 390.0)  # trained again: that time was spent too
    again = TrainingFile(path)
    assert [(r["run"], r["seconds"]) for r in again.rows] == [(WARM_START, 382.4), ("mask-s0", 4021.4),
                                                               (WARM_START, 390.0)]
    assert again.seconds == pytest.approx(382.4 + 4021.4 + 390.0)
    assert again.has("mask-s0", 4021.4) and not again.has("mask-s0", 4000.0)
    path.write_text("run,seconds\nmask-s0,4021.4\nmask-s1,an hour\n")
    with pytest.raises(ValueError, match=r"training\.csv:3: column seconds: expected a number"):
        TrainingFile(path)
    path.write_text("run,seconds\n,12\n")
    with pytest.raises(ValueError, match=r"training\.csv:2: expected a run name"):
        TrainingFile(path)


def test_second_round_arms_and_sizes():
    """Round 2: five arms from the same warm start and tasks as the first grid, 4x the online steps."""
    assert [a.name for a in arms(ROUND2.online_steps, ROUND2.arm_set)] == [
        "mask", "echo_01", "echo_005", "paw_step", "echo_01_guard"]
    assert ROUND2.online_steps == 4 * FULL.online_steps and ROUND2.eval_steps() == [32, 64]
    coefs = {a.name: online_config(ROUND2, a, 0, Path("r"), Path("w"))["model"]["world_coef"]
             for a in arms(ROUND2.online_steps, ROUND2.arm_set)}
    assert coefs == {"mask": 0.0, "echo_01": 0.01, "echo_005": 0.005, "paw_step": 1.0, "echo_01_guard": 0.01}
    guarded = online_config(ROUND2, arms(ROUND2.online_steps, ROUND2.arm_set)[-1], 0, Path("r"), Path("w"))
    assert guarded["model"]["world_entropy_guard"] == 0.1
    same = ("model", "seeds", "warm_start_steps", "group_size", "groups_per_step", "lr", "temperature",
            "max_new_tokens", "max_turns", "eval_tasks", "eval_samples", "env_seed", "eval_torch_seed")
    assert all(getattr(ROUND2, k) == getattr(FULL, k) for k in same)
    with pytest.raises(ValueError, match="arm_set"):
        arms(16, "third")


def test_interval_of_mean_shrinks_with_more_runs():
    one = interval_of_mean([0.5], [0.4], [0.6])
    three = interval_of_mean([0.5, 0.4, 0.6], [0.4, 0.3, 0.5], [0.6, 0.5, 0.7])
    assert one == pytest.approx((0.4, 0.6))
    assert three[0] == pytest.approx(0.5 - 0.1 / math.sqrt(3)) and three[1] == pytest.approx(0.5 + 0.1 / math.sqrt(3))


def _metrics(success: float, nll: float) -> dict[str, float]:
    row = dict.fromkeys(METRIC_COLUMNS, 1.0)
    for split in ("heldout_trees", "heldout_tasks"):
        row.update({f"{split}_success": success, f"{split}_success_low": success - 0.1,
                    f"{split}_success_high": success + 0.1, f"{split}_valid_action_rate": 0.9})
    row.update(expert_world_nll=nll, own_world_nll=math.nan)
    return row


def test_results_file_round_trip_and_report_over_seeds(tmp_path):
    path = tmp_path / "results.csv"
    results = ResultsFile(path)
    results.add(WARM_START, 0, 0, _metrics(0.30, 2.0))
    results.add("mask", 0, 4, _metrics(0.40, 2.2))
    results.add("mask", 1, 4, _metrics(0.50, 2.4))
    results.add("mask", 0, 2, _metrics(0.35, 2.1))
    again = ResultsFile(path)
    assert again.has("mask", 1, 4) and not again.has("mask", 2, 4)
    assert [(r["arm"], r["seed"], r["step"]) for r in again.rows] == [
        (WARM_START, 0, 0), ("mask", 0, 2), ("mask", 0, 4), ("mask", 1, 4)]
    assert math.isnan(again.rows[0]["own_world_nll"])  # an NLL over no tokens stays empty, not 0

    # The warm start is every arm's step 0; the band is the range over seeds.
    assert series(again.rows, "mask", "heldout_trees_success") == [
        (0, 0.30, 0.30, 0.30, 1), (2, 0.35, 0.35, 0.35, 1), (4, pytest.approx(0.45), 0.40, 0.50, 2)]
    assert series(again.rows, "mask", "own_world_nll") == []

    table = markdown_table(again.rows, arms(8))
    mask_row = next(line for line in table.splitlines() if line.startswith("| mask:"))
    cells = [c.strip() for c in mask_row.strip("|").split("|")]
    assert cells[1:3] == ["2", "4"]  # two seeds at the last step (4), never the best step
    half = 100 * 1.959964 * math.sqrt(2) * (0.1 / 1.959964) / 2
    assert cells[3] == f"45.0 ± 7.1 [{45 - half:.1f}, {45 + half:.1f}]"
    assert cells[6] == "2.300 ± 0.141" and cells[8] == "n/a"
    assert sum(line.startswith("| echo:") for line in table.splitlines()) == 1  # not evaluated yet: empty row


def test_two_grid_processes_sharing_one_results_file_keep_each_others_rows(tmp_path):
    """Two writers opened on the same file (as two grid processes on disjoint arms): each add keeps the rows the
    other added since; re-adding a key replaces its row."""
    path = tmp_path / "results.csv"
    metrics = dict.fromkeys(METRIC_COLUMNS, 0.5)
    first, second = ResultsFile(path), ResultsFile(path)
    first.add(WARM_START, 0, 0, metrics)
    second.add("echo", 0, 8, metrics)
    first.add("mask", 0, 8, metrics)
    second.add("echo", 0, 8, {**metrics, METRIC_COLUMNS[0]: 0.25})
    rows = ResultsFile(path).rows
    assert [(r["arm"], r["step"]) for r in rows] == [(WARM_START, 0), ("echo", 8), ("mask", 8)]
    assert rows[1][METRIC_COLUMNS[0]] == 0.25


def test_a_run_trained_again_replaces_its_rows_and_a_stale_recipe_is_refused(tmp_path):
    """remove_run drops one run's rows only; a finished run whose stored model settings differ from the current
    recipe (e.g. an arm fixed after it ran) raises naming the setting, instead of being reported as the new one."""
    import yaml

    from lit_echo.experiments.compare import _check_same_recipe
    from lit_echo.experiments.grid import FULL, online_config

    path = tmp_path / "results.csv"
    metrics = dict.fromkeys(METRIC_COLUMNS, 0.5)
    results = ResultsFile(path)
    for arm, seed, step in [(WARM_START, 0, 0), ("paw", 0, 8), ("paw", 0, 16), ("paw", 1, 8), ("mask", 0, 8)]:
        results.add(arm, seed, step, metrics)
    results.remove_run("paw", 0)
    assert [(r["arm"], r["seed"], r["step"]) for r in ResultsFile(path).rows] == [
        (WARM_START, 0, 0), ("mask", 0, 8), ("paw", 1, 8)]

    paw = next(a for a in arms(FULL.online_steps) if a.name == "paw")
    root = tmp_path / "runs" / "paw-s0"
    root.mkdir(parents=True)
    config = online_config(FULL, paw, 0, root, tmp_path / "warm_start" / "adapter")
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    moved = online_config(FULL, paw, 0, root, tmp_path / "elsewhere" / "adapter")
    _check_same_recipe(root, moved)  # same recipe, other paths: accepted
    old = {**config, "model": {**config["model"], "world_coef": 0.05}}
    (root / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ValueError, match=r"paw-s0: .*model\.world_coef: 0\.05 now 1\.0"):
        _check_same_recipe(root, config)


def test_results_file_rejects_another_header(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("arm,seed,step,success\nmask,0,1,0.5\n")
    with pytest.raises(ValueError, match=r"results\.csv: header"):
        ResultsFile(path)


@pytest.mark.slow
def test_quick_grid_runs_every_arm_and_a_second_run_skips_everything(tmp_path, monkeypatch):
    from lit_echo.experiments.compare import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "grid"
    summary = main(["--quick", "--out", str(out)])
    names = [a.name for a in arms(QUICK.online_steps) if not a.retired]
    assert summary.failures == []
    assert summary.trained == [WARM_START] + [f"{name}-s{seed}" for seed in QUICK.seeds for name in names]

    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    expected = {(WARM_START, "0", "0")} | {(name, str(seed), str(step)) for name in names for seed in QUICK.seeds
                                             for step in QUICK.eval_steps()}
    assert {(r["arm"], r["seed"], r["step"]) for r in rows} == expected and len(rows) == len(expected)
    assert len(summary.evaluated) == len(expected)
    for row in rows:
        for split in ("heldout_trees", "heldout_tasks"):
            assert int(float(row[f"{split}_episodes"])) == QUICK.eval_tasks * QUICK.eval_samples
            low, rate, high = (float(row[f"{split}_success{s}"]) for s in ("_low", "", "_high"))
            assert 0.0 <= low <= rate <= high <= 1.0
            assert 0.0 <= float(row[f"{split}_valid_action_rate"]) <= 1.0
        assert float(row["expert_world_tokens"]) > 0 and float(row["expert_world_nll"]) > 0
        assert 0.0 <= float(row["expert_world_acc"]) <= 1.0
    for name in names:  # every evaluated adapter is one the run exported, and the episodes are kept
        for step in QUICK.eval_steps():
            assert (out / "runs" / f"{name}-s0" / "adapters" / f"step-{step}" / "adapter_model.safetensors").is_file()
            assert (out / "evals" / f"{name}-s0" / f"step-{step}" / "heldout_trees.jsonl").stat().st_size > 0
            # each point evaluated in its own process: its metrics file and log
            assert (out / "evals" / f"{name}-s0" / f"step-{step}" / "metrics.json").is_file()
            assert (out / "evals" / f"{name}-s0" / f"step-{step}.log").is_file()

    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out / "results.png").shape
    assert height > 200 and width > 200
    table = (out / "results.md").read_text()
    for name in names:
        assert sum(line.startswith(f"| {name}:") for line in table.splitlines()) == 1
        # Each run's last step against the warm start, paired over the same tasks.
        assert sum(line.startswith(f"- {name}, seed 0, step {QUICK.online_steps}: unseen trees ")
                   for line in table.splitlines()) == 1
        # Each arm's mean over seeds against the warm start and (other arms) against masking: four intervals.
        row = [line for line in table.splitlines() if line.startswith(f"| {name} | {len(QUICK.seeds)} | ")]
        assert len(row) == 1
        assert row[0].count("[") == (2 if name == "mask" else 4)

    csv_before = (out / "results.csv").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/done.json")}
    published = tmp_path / "published"
    again = main(["--quick", "--out", str(out), "--publish", str(published)])
    assert again.trained == [] and again.evaluated == [] and again.failures == []
    assert (out / "results.csv").read_bytes() == csv_before
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/done.json")} == stamps  # nothing retrained

    # Another sitting on another machine: only the published files. Nothing is trained or evaluated again
    # (not even the warm start), and the paired intervals come out the same from tasks.csv alone.
    tasks = TasksFile(published / "tasks.csv")
    assert all(tasks.has(r["arm"], int(r["seed"]), int(r["step"])) for r in rows)
    elsewhere = tmp_path / "elsewhere"
    resumed = main(["--quick", "--out", str(elsewhere), "--resume-from", str(published)])
    assert resumed.trained == [] and resumed.evaluated == [] and resumed.failures == []
    assert not (elsewhere / "warm_start").exists() and not (elsewhere / "evals").exists()
    paired = [line for line in table.splitlines() if line.startswith(("| mask |", "- "))]
    assert paired and [line for line in (elsewhere / "results.md").read_text().splitlines()
                       if line.startswith(("| mask |", "- "))] == paired
    # The cost line counts every training of the grid, also where the run directories are gone.
    trainings = TrainingFile(published / "training.csv").rows
    assert sorted(r["run"] for r in trainings) == sorted(["warm_start"] + [f"{n}-s0" for n in names])
    assert all(r["seconds"] > 0 for r in trainings)
    cost = [line for line in table.splitlines() if line.startswith("Compute spent")]
    assert len(cost) == 1 and f"training {sum(r['seconds'] for r in trainings) / 60:.1f} min" in cost[0]
    assert [line for line in (elsewhere / "results.md").read_text().splitlines()
            if line.startswith("Compute spent")] == cost


@pytest.mark.slow
def test_a_grid_killed_mid_run_continues_from_its_checkpoint_bit_identical(tmp_path):
    """SIGKILL of the grid process while an online run trains (its fit dies with it), then the same command: the
    run continues from its newest checkpoint, and its final adapter and its rollout buffer are those of a grid
    that was never interrupted, to the bit. (The quick grid with 24 online steps, so a checkpoint comes before
    the end: one every 8 steps.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    steps = 24
    code = ("import dataclasses, sys; from lit_echo.experiments import compare; "
            f"compare.QUICK = dataclasses.replace(compare.QUICK, online_steps={steps}, eval_every={steps}); "
            "compare.main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-c", code, "--quick", "--out", str(out), "--arms", "mask"]

    def finish(out: Path) -> None:
        result = subprocess.run(command(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                                check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(whole)
    run = killed / "runs" / "mask-s0"
    with open(tmp_path / "killed.log", "w") as log_file:
        process = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while True:  # until the step-8 checkpoint is whole (it loads), then kill the grid in the middle of the run
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 8"
        try:
            torch.load(run / "checkpoints" / "step=8.ckpt", weights_only=False)
            break
        except (FileNotFoundError, RuntimeError, EOFError):
            time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "done.json").exists(), "the run had finished before the kill: nothing was tested"

    finish(killed)
    assert (run / "done.json").exists() and not (run / "checkpoints").exists()  # finished: checkpoints deleted
    assert [p.name for p in run.glob("fit-from-*.log")] == [p.name for p in run.glob("fit-from-step=*.log")] != []
    # The cost of both invocations: the killed one until its log's last write, then the continuation.
    pieces = json.loads((run / "pieces.json").read_text())
    assert [p["log"][:len("fit-from-step=")] for p in pieces] == ["fit.log", "fit-from-step="]
    assert all(p["seconds"] > 0 for p in pieces)
    done = json.loads((run / "done.json").read_text())
    assert done == {"seconds": round(sum(p["seconds"] for p in pieces), 1), "invocations": 2}
    assert {"run": "mask-s0", "seconds": done["seconds"]} in TrainingFile(killed / "training.csv").rows
    adapter = f"runs/mask-s0/adapters/step-{steps}/adapter_model.safetensors"
    before, after = load_file(whole / adapter), load_file(killed / adapter)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def trained_rollouts(out: Path) -> list[dict]:
        lines = (out / "runs" / "mask-s0" / "rollouts" / "rollouts-rank0.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        for record in records:
            record["metadata"].pop("run_id")  # one per run: differs between the two grids
        return records

    assert trained_rollouts(killed) == trained_rollouts(whole)
    assert len(trained_rollouts(whole)) == steps * QUICK.groups_per_step * QUICK.group_size


def test_a_grid_of_another_precision_names_the_machine_it_needs(tmp_path):
    """Round 2 continued on a CPU without native bf16 (precision 'auto' resolves to 32-true there): one error that
    says why, not a generic size mismatch."""
    import dataclasses

    from lit_echo.experiments.compare import Grid

    out = tmp_path / "grid"
    Grid(dataclasses.replace(ROUND2, precision="bf16-mixed"), out, REPO / "data" / "shellworld")
    with pytest.raises(ValueError, match=r"trained with precision bf16-mixed, and this machine resolves precision "
                                         r"'auto' to 32-true .*continue it on a machine that runs bf16-mixed"):
        Grid(dataclasses.replace(ROUND2, precision="32-true"), out, REPO / "data" / "shellworld")
    # Writing the report trains nothing: any machine may read the points, and the grid keeps its own precision.
    reader = Grid(dataclasses.replace(ROUND2, precision="32-true"), out, REPO / "data" / "shellworld",
                  report_only=True)
    assert reader.spec.precision == "bf16-mixed"
    assert json.loads((out / "spec.json").read_text())["precision"] == "bf16-mixed"


def test_the_published_round2_report_is_rewritten_the_same_on_any_machine(tmp_path):
    """``--report-only`` on a copy of results/round2 (trained in bf16-mixed) writes back the committed report."""
    from lit_echo.experiments.compare import main

    copy = tmp_path / "round2"
    shutil.copytree(REPO / "results" / "round2", copy)
    main(["--grid", "round2", "--out", str(copy), "--data-dir", str(REPO / "data" / "shellworld"), "--report-only"])
    assert (copy / "results.md").read_text() == (REPO / "results" / "round2" / "results.md").read_text()


def test_a_grid_directory_made_before_new_spec_fields_is_still_accepted(tmp_path):
    """spec.json written by a version without ``own_nll_episodes`` / ``arm_set``: those take their defaults."""
    from lit_echo.experiments.compare import Grid

    out = tmp_path / "grid"
    out.mkdir()
    old = {k: v for k, v in json.loads(json.dumps(FULL.to_json())).items() if k not in ("own_nll_episodes", "arm_set")}
    (out / "spec.json").write_text(json.dumps(old))
    Grid(FULL, out, REPO / "data" / "shellworld")
    with pytest.raises(ValueError, match=r"other sizes \(differs in \['arm_set', 'eval_every', 'online_steps', "
                                         r"'own_nll_episodes'\]\)"):
        Grid(ROUND2, out, REPO / "data" / "shellworld")


def test_the_command_refuses_another_grids_directory_and_missing_buffers_without_a_traceback(tmp_path):
    from lit_echo.experiments.compare import main

    out = tmp_path / "grid"
    out.mkdir()
    (out / "spec.json").write_text(json.dumps({"model": "another", "online_steps": 3}))
    with pytest.raises(SystemExit, match=r"error: .*spec\.json: this directory holds a grid with other sizes"):
        main(["--out", str(out), "--data-dir", str(REPO / "data" / "shellworld")])
    with pytest.raises(SystemExit, match=r"error: .*expert-train\.jsonl\.gz: missing; --data-dir"):
        main(["--out", str(tmp_path / "fresh"), "--data-dir", str(tmp_path)])


def test_a_retired_arm_is_refused_before_anything_trains(tmp_path):
    """The PaW arm that ranked its selection per micro-batch is kept for its rows only: asking to run it is an
    error naming why, and nothing (not even the warm start) is trained."""
    from lit_echo.experiments.compare import main

    out = tmp_path / "grid"
    with pytest.raises(SystemExit, match=r"error: arm paw is retired: it ran before the entropy selection"):
        main(["--quick", "--out", str(out), "--arms", "paw", "--data-dir", str(REPO / "data" / "shellworld")])
    assert not (out / "warm_start").exists()


def test_report_only_writes_the_report_from_the_rows_so_far_and_trains_nothing(tmp_path):
    from lit_echo.experiments.compare import main

    out = tmp_path / "grid"
    metrics = {**dict.fromkeys(METRIC_COLUMNS, 0.5), "heldout_trees_success": 0.25}
    results = ResultsFile(out / "results.csv")
    results.add(WARM_START, 0, 0, metrics)
    results.add("mask", 1, 16, metrics)
    summary = main(["--out", str(out), "--data-dir", str(REPO / "data" / "shellworld"), "--report-only",
                    "--publish", str(tmp_path / "published")])
    assert summary.trained == [] and summary.evaluated == []
    assert not (out / "warm_start").exists() and not (out / "runs").exists()
    table = (tmp_path / "published" / "results.md").read_text()
    assert any(line.startswith("| mask:") and "25.0" in line for line in table.splitlines())
    assert (tmp_path / "published" / "results.png").read_bytes().startswith(PNG_SIGNATURE)
