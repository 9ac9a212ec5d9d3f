"""One evaluation point: an exported adapter on both held-out ShellWorld splits and two world-model buffers.

Built on :mod:`lit_echo.evaluate` (the same generator and world-model sums as ``python -m lit_echo.evaluate``).
Per point:

* for each split of :data:`~lit_echo.experiments.grid.EVAL_SPLITS`: success rate with a 95% task-bootstrap
  interval, valid-command rate and mean turns over ``eval_tasks`` tasks x ``eval_samples`` episodes; the
  episodes are kept as ``<split>.jsonl`` in the point's directory;
* world NLL and top-1 accuracy on the OBSERVATION tokens of the fixed held-out expert buffer (``expert_*``) and
  of the policy's own held-out episodes just played (``own_*``; with ``spec.own_nll_episodes``, the first that
  many of each split). An NLL over zero tokens is left empty.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lit_echo import models
from lit_echo.evaluate import agent_metrics, load_policy, world_metrics
from lit_echo.experiments.grid import ENV_CLASS, EVAL_SPLITS, GridSpec
from lit_echo.experiments.intervals import task_bootstrap_interval
from lit_echo.online.generator import SamplingSettings
from lit_echo.online.writer import RolloutWriter

METRICS_FILE = "metrics.json"  # what ``main`` leaves in the point's directory
METRIC_COLUMNS = [
    *(f"{split}_{name}" for split in EVAL_SPLITS
      for name in ("success", "success_low", "success_high", "episodes", "tasks", "valid_action_rate",
                   "turns_mean")),
    "expert_world_nll", "expert_world_acc", "expert_world_tokens",
    "own_world_nll", "own_world_acc", "own_world_tokens",
    "eval_seconds",
]


def sampling_settings(spec: GridSpec) -> SamplingSettings:
    return SamplingSettings(temperature=spec.temperature, top_p=1.0, max_new_tokens=spec.max_new_tokens,
                            max_turns=spec.max_turns, max_total_tokens=spec.max_total_tokens,
                            max_observation_chars=spec.max_observation_chars)


def _world(policy, tokenizer, buffer: Path, prefix: str, max_length: int) -> dict[str, float]:
    result = world_metrics(policy, tokenizer, str(buffer), max_length=max_length)
    tokens = result["world_tokens"]
    return {f"{prefix}_world_nll": result["world_nll"] if tokens else math.nan,
            f"{prefix}_world_acc": result["world_acc"] if tokens else math.nan,
            f"{prefix}_world_tokens": tokens}


def _play(policy, tokenizer, spec: GridSpec, split: str, path: Path) -> dict[str, float]:
    """Agent metrics on ``split``; the episodes are appended to ``path``."""
    torch.manual_seed(spec.eval_torch_seed)  # every point samples from the same random stream
    writer = RolloutWriter(path)
    successes: list[int] = []  # per task
    episodes: list[int] = []

    def keep(seed: int, rollouts) -> None:
        writer.write_group(rollouts)
        successes.append(sum(bool(r.metadata.get("success")) for r in rollouts))
        episodes.append(len(rollouts))

    try:
        agent = agent_metrics(policy, tokenizer, ENV_CLASS, {"split": split}, range(spec.eval_tasks),
                              spec.eval_samples, sampling_settings(spec), on_group=keep,
                              tasks_per_batch=spec.eval_tasks_per_batch)
    finally:
        writer.close()
    low, high = task_bootstrap_interval(successes, episodes)
    return {f"{split}_success": agent["success_rate"], f"{split}_success_low": low,
            f"{split}_success_high": high, f"{split}_episodes": agent["rollouts"], f"{split}_tasks": len(episodes),
            f"{split}_valid_action_rate": agent["valid_action_rate"], f"{split}_turns_mean": agent["turns_mean"]}


def _own_world(policy, tokenizer, spec: GridSpec, point_dir: Path) -> dict[str, float]:
    """World metrics on the point's own episodes: all of them, or the first ``spec.own_nll_episodes`` of each
    split (copied to a temporary directory, the point's files left as they are)."""
    if spec.own_nll_episodes is None:
        return _world(policy, tokenizer, point_dir, "own", spec.max_length)
    with tempfile.TemporaryDirectory(prefix="lit-echo-own-") as tmp:
        for split in EVAL_SPLITS:
            with open(point_dir / f"{split}.jsonl") as src, open(Path(tmp) / f"{split}.jsonl", "w") as dst:
                for _, line in zip(range(spec.own_nll_episodes), src):
                    dst.write(line)
        return _world(policy, tokenizer, Path(tmp), "own", spec.max_length)


def task_counts(path: Path) -> dict[int, tuple[int, int]]:
    """``(wins, episodes)`` of each task seed among the episodes written to ``path`` by an evaluation ({} if
    absent)."""
    counts: dict[int, list[int]] = {}
    if not path.is_file():
        return {}
    with open(path) as fh:
        for line in fh:
            metadata = json.loads(line)["metadata"]
            count = counts.setdefault(int(metadata["env_seed"]), [0, 0])
            count[0] += bool(metadata.get("success"))
            count[1] += 1
    return {seed: (wins, total) for seed, (wins, total) in counts.items()}


def task_success_rates(path: Path) -> dict[int, float]:
    """Success rate of each task seed among the episodes written to ``path`` by an evaluation ({} if absent)."""
    return {seed: wins / total for seed, (wins, total) in task_counts(path).items()}


def evaluate_point(spec: GridSpec, adapter: Path, point_dir: Path, expert_buffer: Path) -> dict[str, float]:
    """All :data:`METRIC_COLUMNS` of the policy ``spec.model`` + ``adapter``; episodes written under
    ``point_dir`` (emptied first: what an interrupted evaluation left there is not reused)."""
    started = time.perf_counter()
    if point_dir.exists():
        shutil.rmtree(point_dir)
    point_dir.mkdir(parents=True)
    tokenizer = models.load_tokenizer(spec.model)
    policy = load_policy(spec.model, str(adapter), bf16=spec.precision == "bf16-mixed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy.to(device)
    row: dict[str, float] = {}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=spec.precision == "bf16-mixed"):
        for split in EVAL_SPLITS:
            row.update(_play(policy, tokenizer, spec, split, point_dir / f"{split}.jsonl"))
        row.update(_world(policy, tokenizer, expert_buffer, "expert", spec.max_length))
        row.update(_own_world(policy, tokenizer, spec, point_dir))
    row["eval_seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    """One point in this process (the grid runs each in a fresh one): the metrics go to POINT_DIR/metrics.json."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("spec", help="the grid's GridSpec as JSON")
    parser.add_argument("adapter")
    parser.add_argument("point_dir")
    parser.add_argument("expert_buffer")
    args = parser.parse_args(argv)
    fields = json.loads(args.spec)
    spec = GridSpec(**{**fields, "seeds": tuple(fields["seeds"])})
    point_dir = Path(args.point_dir)
    metrics = evaluate_point(spec, Path(args.adapter), point_dir, Path(args.expert_buffer))
    (point_dir / METRICS_FILE).write_text(json.dumps(metrics) + "\n")


if __name__ == "__main__":
    main()
