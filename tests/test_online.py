"""Online training end to end: a real Lightning Trainer, EchoModule on the tiny model, real environments."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_echo.data.buffer import RolloutBuffer
from lit_echo.data.datamodule import RolloutDataModule
from lit_echo.envs.base import StepResult
from lit_echo.module import EchoModule
from lit_echo.online import OnlineRolloutDataModule
from lit_echo.rollout import Rollout

REPO = Path(__file__).resolve().parents[1]


class FlakyEnv:
    """Raises on every step of odd seeds: training must go on with reward-0 rollouts for those tasks."""

    def reset(self, seed: int):
        self.seed = seed
        return [{"role": "system", "content": "Reply with anything."}, {"role": "user", "content": f"Task {seed}."}]

    def step(self, action: str) -> StepResult:
        if self.seed % 2:
            raise RuntimeError(f"task {self.seed} is broken")
        return StepResult("ok\n", reward=float(len(action) % 2), done=True, info={"success": len(action) % 2 == 1})


class BatchRecorder(L.Callback):
    def __init__(self):
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)


def _fit(checkpoint, tmp_path, max_steps=3, **data_kwargs):
    kwargs = dict(env_class="lit_echo.envs.shellworld.ShellWorld", env_kwargs={"split": "train"},
                  group_size=2, groups_per_step=1, generate_every=2, max_new_tokens=8, max_turns=2,
                  max_total_tokens=768, buffer_dir=str(tmp_path / "rollouts"), tokenizer=str(checkpoint),
                  max_length=768)
    kwargs.update(data_kwargs)
    torch.manual_seed(0)
    module = EchoModule(model_name_or_path=str(checkpoint), lora_rank=4, world_coef=0.5, lr=1e-3, temperature=0.9)
    data = OnlineRolloutDataModule(**kwargs)
    recorder = BatchRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=TensorBoardLogger(tmp_path / "tb"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[recorder])
    trainer.fit(module, datamodule=data)
    return trainer, data, recorder.batches


def _rows(batch):
    """(input_ids, roles, advantage, policy_version) of each row of a padded batch."""
    rows = []
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        rows.append((batch["input_ids"][i, :n].tolist(), batch["roles"][i, :n].tolist(),
                     batch["advantages"][i].item(), batch["policy_version"][i].item()))
    return rows


def _scalars(log_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path, size_guidance={"tensors": 0, "scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in events.Scalars(tag))
        for tag in events.Tags()["tensors"]:
            out.setdefault(tag, []).extend(events.Tensors(tag))
    return out


def test_online_fit_writes_every_rollout_and_restart_appends(tiny_checkpoint, tmp_path):
    trainer, data, batches = _fit(tiny_checkpoint, tmp_path)
    assert trainer.global_step == 3 and len(batches) == 3
    path = tmp_path / "rollouts" / "rollouts-rank0.jsonl"
    lines = path.read_text().splitlines()
    # Two rounds of generate_every=2 steps x 1 group x 2 rollouts cover the 3 steps.
    assert len(lines) == 8

    # Read back by the offline buffer: the trained batches are the first records, token for token and role for role.
    stored = [item.rollout for item in RolloutBuffer(path, shuffle=False)]
    trained = [row for batch in batches for row in _rows(batch)]
    for (ids, roles, advantage, version), rollout in zip(trained, stored):
        assert (ids, roles) == (rollout.input_ids, rollout.roles)
        assert advantage == pytest.approx(rollout.advantage) and version == rollout.policy_version
        assert rollout.logprobs is not None and rollout.metadata["env"] == "ShellWorld"
    # Distinct task per group, two rollouts per group.
    seeds = [r.metadata["env_seed"] for r in stored]
    assert seeds[::2] == list(range(len(stored) // 2)) and seeds[::2] == seeds[1::2]
    # Round 1 (steps 0-1) is made before any update; round 2 is fetched one batch ahead, after step 0 only.
    assert [r.policy_version for r in stored[:8]] == [0] * 4 + [1] * 4
    assert [b["policy_version"].tolist() for b in batches] == [[0, 0], [0, 0], [1, 1]]

    scalars = _scalars(tmp_path / "tb")
    for name in ("rollout/success_rate", "rollout/turns_mean", "rollout/invalid_action_rate", "rollout/env_errors",
                 "perf/rollouts_per_s", "perf/gen_tokens_per_s", "losses/world"):
        assert scalars.get(name), name
    samples = [tag for tag in scalars if tag.startswith("rollouts/sample_")]
    assert samples, "sample rollouts are logged as TensorBoard text"
    text = scalars[samples[0]][0].tensor_proto.string_val[0].decode()
    assert "[ACTION]" in text and "[/ACTION]" in text

    # A crash mid-write leaves half a line; a restarted run drops it and appends, never overwrites.
    before = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b'{"input_ids": [1, 2')
    _fit(tiny_checkpoint, tmp_path, max_steps=1)
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    assert len(list(RolloutBuffer(path, shuffle=False, on_bad_record="raise"))) == after.count(b"\n")


def test_failing_environment_does_not_stop_training_and_offline_mix(tiny_checkpoint, tmp_path):
    trainer, data, batches = _fit(
        tiny_checkpoint, tmp_path, max_steps=2, env_class=f"{FlakyEnv.__module__}.FlakyEnv", env_kwargs={},
        env_step_timeout_s=5, generate_every=1, offline_path=str(REPO / "data/sample/train.jsonl"),
        offline_ratio=0.5)
    assert trainer.global_step == 2
    assert data.hparams.batch_size == 4  # 2 online + 2 offline rows
    for batch in batches:
        online = ~torch.isnan(batch["old_logprobs"]).all(1)  # offline sample records carry no log-probs
        assert online.tolist() == [True, True, False, False]
    stored = [Rollout.from_json(line) for line in (tmp_path / "rollouts/rollouts-rank0.jsonl").read_text().splitlines()]
    broken = [r for r in stored if r.metadata["env_seed"] % 2]
    assert broken and all(r.reward == 0 and r.metadata["stop_reason"] == "env_error" for r in broken)
    assert all("RuntimeError: task" in r.metadata["env_error"] for r in broken)
    assert max(_scalars(tmp_path / "tb")["rollout/env_errors"]) == 2


def test_configuration_errors_are_explicit():
    with pytest.raises(ValueError, match="batch_size=8 does not match"):
        OnlineRolloutDataModule(group_size=2, groups_per_step=2, batch_size=8)
    with pytest.raises(ValueError, match="num_workers must be 0"):
        OnlineRolloutDataModule(num_workers=2)
    with pytest.raises(ImportError, match="has no attribute 'Nope'"):
        OnlineRolloutDataModule(env_class="lit_echo.envs.shellworld.Nope")
    with pytest.raises(ValueError, match="needs offline_path"):
        OnlineRolloutDataModule(offline_ratio=0.5)


def test_tiny_online_recipe_runs_and_its_buffer_reads_back(tmp_path):
    """configs/tiny-online.yaml through the CLI (shortened), then RolloutDataModule(train_path=buffer dir)."""
    from lit_echo.cli import run

    buffer_dir = tmp_path / "rollouts"
    run(["fit", "--config", str(REPO / "configs/tiny-online.yaml"), "--trainer.max_steps=2",
          "--trainer.val_check_interval=2", f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.init_args.buffer_dir={buffer_dir}",
          f"--data.init_args.offline_path={REPO / 'data/sample/train.jsonl'}"])
    raw = [json.loads(line) for line in (buffer_dir / "rollouts-rank0.jsonl").read_text().splitlines()]
    assert raw
    offline = RolloutDataModule(train_path=str(buffer_dir), tokenizer="tiny-random", shuffle=False, repeat=False,
                                batch_size=2, max_length=None)
    rows = [row for batch in offline.train_dataloader() for row in _rows(batch)]
    assert [(ids, roles) for ids, roles, _, _ in rows] == [(r["input_ids"], r["roles"]) for r in raw]
    assert any(tag.startswith("val_rollout/") for tag in _scalars(tmp_path))


def test_textworld_recipe_is_a_valid_config():
    from lit_echo.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/textworld.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
