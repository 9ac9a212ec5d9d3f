"""Exactly-once training data across a real crash: ``kill -9`` of ``python -m lit_echo.cli fit`` (online, tiny
model, a checkpoint every step), resume from the newest checkpoint, then every group of the buffer was trained
once, by the surviving lineage, at the step its record names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_echo.experiments.compare import newest_loadable_checkpoint
from lit_echo.rollout import Rollout

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8


def _override(tmp_path: Path) -> Path:
    path = tmp_path / "crash.yaml"
    path.write_text(f"""
trainer:
  max_steps: {MAX_STEPS}
  limit_val_batches: 0
  enable_checkpointing: true
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {tmp_path / 'ckpt'}
        every_n_train_steps: 1
        save_top_k: -1
    - class_path: tests.online_recorder.TrainedRows
      init_args:
        path: {tmp_path / 'trained.jsonl'}
data:
  init_args:
    group_size: 2
    generate_every: 2
    max_new_tokens: 8
    max_turns: 2
    offline_path: null
    offline_ratio: 0.0
    val_env_kwargs: null
""")
    return path


@pytest.mark.slow
def test_kill_9_and_resume_trains_every_group_once(tmp_path):
    command = [sys.executable, "-m", "lit_echo.cli", "fit", "--config", str(REPO / "configs/tiny-online.yaml"),
               "--config", str(_override(tmp_path))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    trained_log = tmp_path / "trained.jsonl"
    with open(tmp_path / "run1.log", "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    # Kill during step 4: checkpoints exist, and groups were generated (prefetched) after the newest one.
    while not (trained_log.exists() and any(json.loads(line)["step"] >= 4
                                            for line in trained_log.read_text().splitlines())):
        assert process.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 4"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    buffer = tmp_path / "rollouts" / "rollouts-rank0.jsonl"
    before = [Rollout.from_json(line) for line in buffer.read_text().splitlines()]
    ckpt = newest_loadable_checkpoint(tmp_path / "ckpt")  # the kill may have cut the newest one short
    assert ckpt is not None, f"no loadable checkpoint in {tmp_path / 'ckpt'}"
    resumed_at = int(ckpt.stem.split("step=")[1])
    assert max(r.metadata["group_index"] for r in before) >= resumed_at, "nothing generated after the checkpoint"

    result = subprocess.run(command + [f"--ckpt_path={ckpt}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    stored = [Rollout.from_json(line) for line in buffer.read_text().splitlines()]
    # Each group once, in order, one per step (groups_per_step=1), one run id across the resume.
    assert [r.metadata["group_index"] for r in stored[::2]] == list(range(MAX_STEPS))
    assert [r.metadata["train_step"] for r in stored[::2]] == list(range(MAX_STEPS))
    assert len({r.group_id for r in stored}) == MAX_STEPS and len({r.metadata["run_id"] for r in stored}) == 1
    # ... and exactly the rows each step of the surviving lineage trained on (the last record of a step wins:
    # steps after the checkpoint were trained twice, first by weights the resume discarded).
    trained: dict[int, list] = {}
    for line in trained_log.read_text().splitlines():
        entry = json.loads(line)
        trained[entry["step"]] = entry["rows"]
    assert sorted(trained) == list(range(MAX_STEPS))
    for step, rows in trained.items():
        assert rows == [r.input_ids for r in stored if r.metadata["train_step"] == step], step
    # What was set aside is valid JSON lines of groups from the checkpoint on: nothing trained is missing above.
    aside = [Rollout.from_json(line) for line in Path(f"{buffer}.untrained").read_text().splitlines()]
    assert aside and all(r.metadata["group_index"] >= resumed_at for r in aside)
