"""Online training end to end: a real Lightning Trainer, EchoModule on the tiny model, real environments."""

from __future__ import annotations

import glob
import json
import pickle
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_echo.data.buffer import RolloutBuffer
from lit_echo.data.datamodule import RolloutDataModule
from lit_echo.envs.base import StepResult
from lit_echo.envs.examples import GuessNumber
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


def _fit(checkpoint, tmp_path, max_steps=3, callbacks=(), ckpt_path=None, trainer_kwargs=None, **data_kwargs):
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
                        enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[recorder, *callbacks],
                        **(trainer_kwargs or {}))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, data, recorder.batches


def _rows(batch):
    """(input_ids, roles, advantage, policy_version) of each row of a padded batch."""
    rows = []
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        rows.append((batch["input_ids"][i, :n].tolist(), batch["roles"][i, :n].tolist(),
                     batch["advantages"][i].item(), batch["policy_version"][i].item()))
    return rows


def _scalars(log_dir, steps: bool = False) -> dict[str, list]:
    """Every scalar's values (or (step, value) pairs) and every text tensor, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path, size_guidance={"tensors": 0, "scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) if steps else e.value for e in events.Scalars(tag))
        for tag in events.Tags()["tensors"]:
            out.setdefault(tag, []).extend(events.Tensors(tag))
    return out


def test_online_fit_writes_every_rollout_and_restart_appends(tiny_checkpoint, tmp_path):
    trainer, _, batches = _fit(tiny_checkpoint, tmp_path)
    assert trainer.global_step == 3 and len(batches) == 3
    path = tmp_path / "rollouts" / "rollouts-rank0.jsonl"
    lines = path.read_text().splitlines()
    # Two rounds of generate_every=2 steps x 1 group x 2 rollouts cover the 3 steps; the group of the 4th step,
    # which never ran, is set aside at the end of the fit.
    assert len(lines) == 6
    untrained = [Rollout.from_json(line) for line in Path(f"{path}.untrained").read_text().splitlines()]
    assert [r.metadata["group_index"] for r in untrained] == [3, 3]

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
    assert [r.metadata["train_step"] for r in stored] == [0, 0, 1, 1, 2, 2]
    # Round 1 (steps 0-1) is made before any update; round 2 is fetched one batch ahead, after step 0 only.
    assert [r.policy_version for r in stored] == [0] * 4 + [1] * 2
    assert [b["policy_version"].tolist() for b in batches] == [[0, 0], [0, 0], [1, 1]]

    scalars = _scalars(tmp_path / "tb", steps=True)
    for name in ("rollout/success_rate", "rollout/turns_mean", "rollout/invalid_action_rate", "rollout/env_errors",
                 "perf/rollouts_per_s", "perf/gen_tokens_per_s"):
        # Once per round, at the step that trains the round's first batch (rounds start at steps 0 and 2).
        assert [step for step, _ in scalars.get(name, [])] == [0, 2], name
    assert any(tag.startswith("rollout/") and tag.endswith("/success_rate") and tag.count("/") == 2
               for tag in scalars), "per task type success rate"
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


@pytest.mark.parametrize("groups_per_batch", [None, 2])
def test_a_steps_groups_are_sampled_together_per_environment(tiny_checkpoint, tmp_path, groups_per_batch):
    """groups_per_step 3 of a two-environment mixture, sampled as one batch per environment (or in batches of 2
    and 1 groups): every group keeps its own seed, environment, group id, index and advantages (mean 0 within the
    group), in index order on disk; the trained rows are those rows; validation through environments samples its
    seeds together too."""
    envs = [{"class_path": "lit_echo.envs.shellworld.ShellWorld", "init_args": {"split": "train"}, "name": "shell"},
            {"class_path": GUESS, "init_args": {"high": 7}, "name": "guess"}]
    trainer, data, batches = _fit(tiny_checkpoint, tmp_path, max_steps=2, env_class=None, env_kwargs=None,
                                  envs=envs, groups_per_step=3, generate_every=1, val_env_kwargs={},
                                  val_episodes=5, groups_per_batch=groups_per_batch)
    trainer.validate(trainer.lightning_module, datamodule=data)
    stored = [Rollout.from_json(line)
              for line in (tmp_path / "rollouts" / "rollouts-rank0.jsonl").read_text().splitlines()]
    assert [r.metadata["group_index"] for r in stored[:12]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    names = set()
    for group in zip(stored[0:12:2], stored[1:12:2]):
        (a, b), index = group, group[0].metadata["group_index"]
        assert a.metadata["env_seed"] == b.metadata["env_seed"] == index  # env_seed 0, one rank
        assert a.group_id == b.group_id == f"{a.metadata['env']}-seed{index}"
        assert a.metadata["env"] == b.metadata["env"] and a.metadata["train_step"] == index // 3
        assert a.advantage + b.advantage == pytest.approx(0.0, abs=1e-6)
        names.add(a.metadata["env"])
    assert names == {"shell", "guess"}, "the mixture should pick both environments over six seeds"
    trained = [row for batch in batches for row in _rows(batch)]
    assert [(ids, roles) for ids, roles, _, _ in trained] == [(r.input_ids, r.roles) for r in stored[:12]]
    scalars = _scalars(tmp_path / "tb")
    assert scalars.get("val/rollout/turns_mean"), sorted(scalars)  # the validation episodes were played


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
    # Only online groups are stored (the offline rows are in data/sample already).
    assert [r.metadata["group_index"] for r in stored] == [0, 0, 1, 1]


SHELL = "lit_echo.envs.shellworld.ShellWorld"
GUESS = "lit_echo.envs.examples.GuessNumber"


def test_configuration_errors_are_explicit():
    with pytest.raises(ValueError, match="batch_size=8 does not match"):
        OnlineRolloutDataModule(env_class=SHELL, group_size=2, groups_per_step=2, batch_size=8)
    with pytest.raises(ValueError, match="num_workers must be 0"):
        OnlineRolloutDataModule(env_class=SHELL, num_workers=2)
    with pytest.raises(ImportError, match="has no attribute 'Nope'"):
        OnlineRolloutDataModule(env_class="lit_echo.envs.shellworld.Nope")
    with pytest.raises(ValueError, match="needs data.offline_path"):
        OnlineRolloutDataModule(env_class=SHELL, offline_ratio=0.5)
    with pytest.raises(ValueError, match="no rollout source: set data.env_class"):
        OnlineRolloutDataModule()
    with pytest.raises(ValueError, match=r"data.envs\[1\].weight: expected a number > 0"):
        OnlineRolloutDataModule(envs=[{"class_path": GUESS}, {"class_path": GUESS, "weight": 0, "name": "b"}])
    with pytest.raises(ValueError, match="several entries are named"):
        OnlineRolloutDataModule(envs=[{"class_path": GUESS}, {"class_path": GUESS}])
    with pytest.raises(ValueError, match="not both"):
        OnlineRolloutDataModule(env_class=GUESS, envs=[{"class_path": GUESS}])


def test_fail_fast_at_construction_names_the_option(tmp_path, monkeypatch):
    """Environment construction and reset, input paths and the buffer directory are checked when the module is
    built (the CLI builds it before the model), each error naming its option."""
    monkeypatch.chdir(tmp_path)
    # The training environment is constructed and reset once.
    with pytest.raises(ValueError, match=r"data.env_class/data.env_kwargs: .*GuessNumber\(\*\*\{'size': 3\}\) "
                                         r"failed: TypeError"):
        OnlineRolloutDataModule(env_class=GUESS, env_kwargs={"size": 3})
    with pytest.raises(ValueError, match=r"data.envs\[0\]: .*reset\(0\) failed: ZeroDivisionError"):
        OnlineRolloutDataModule(envs=[{"class_path": GUESS, "init_args": {"high": 0}}])
    # The validation environment too, with val_env_kwargs merged over env_kwargs (not replacing them).
    with pytest.raises(ValueError, match=r"data.val_env_kwargs \(merged over .*\{'split': 'nope'\}\) failed"):
        OnlineRolloutDataModule(env_class=SHELL, env_kwargs={"split": "train"}, val_env_kwargs={"split": "nope"})
    data = OnlineRolloutDataModule(env_class=GUESS, env_kwargs={"high": 7}, val_env_kwargs={"max_guesses": 2})
    assert [spec.kwargs for spec in data.val_env_specs] == [{"high": 7, "max_guesses": 2}]
    # An environment spec is picklable (class path + kwargs), so worker processes can build instances from it.
    env = pickle.loads(pickle.dumps(data.val_env_specs[0]))()
    assert isinstance(env, GuessNumber) and env.max_guesses == 2
    # Input paths: relative ones are resolved against the working directory, and the error says so.
    with pytest.raises(FileNotFoundError, match=rf"data.offline_path: .*working directory {tmp_path}"):
        OnlineRolloutDataModule(env_class=GUESS, offline_path="data/sample/train.jsonl", offline_ratio=0.5)
    with pytest.raises(FileNotFoundError, match="data.val_path: no rollout files"):
        OnlineRolloutDataModule(env_class=GUESS, val_path=str(tmp_path / "missing.jsonl"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PermissionError, match="data.buffer_dir: cannot write rollouts to .*a-file"):
        OnlineRolloutDataModule(env_class=GUESS, buffer_dir=str(tmp_path / "a-file" / "rollouts"))


def test_fail_fast_at_setup(tiny_checkpoint, tmp_path):
    """The endless stream needs trainer.max_steps; a relative buffer_dir is checked under default_root_dir."""
    module = EchoModule(model_name_or_path=str(tiny_checkpoint), lora_rank=4)
    data = OnlineRolloutDataModule(env_class=GUESS, group_size=2, tokenizer=str(tiny_checkpoint))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="trainer.max_steps is not set"):
        trainer.fit(module, datamodule=data)
    (tmp_path / "root").write_text("")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path / "root")
    with pytest.raises(PermissionError, match="data.buffer_dir: .*taken under trainer.default_root_dir"):
        trainer.fit(module, datamodule=data)


def test_resume_trains_every_group_once(tiny_checkpoint, tmp_path):
    """Resuming from an older checkpoint (what a crash leaves) regenerates the groups after it; the buffer keeps
    each group once: exactly the groups of the final lineage's trained batches, in order."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def checkpoints():
        return [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)]

    _, _, first = _fit(tiny_checkpoint, tmp_path, max_steps=3, generate_every=1, callbacks=checkpoints())
    # Resume after step 1 as if the run had died there: steps 1 and 2 were trained by weights now discarded.
    _, data, second = _fit(tiny_checkpoint, tmp_path, max_steps=3, generate_every=1, callbacks=checkpoints(),
                           ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=1.ckpt"))
    assert data.groups_trained == 3
    path = tmp_path / "rollouts" / "rollouts-rank0.jsonl"
    stored = [item.rollout for item in RolloutBuffer(path, shuffle=False)]
    assert [r.metadata["group_index"] for r in stored] == [0, 0, 1, 1, 2, 2]
    assert len({r.metadata["run_id"] for r in stored}) == 1
    trained = [row for batch in first[:1] + second for row in _rows(batch)]
    assert [(ids, roles) for ids, roles, _, _ in trained] == [(r.input_ids, r.roles) for r in stored]
    # The rest (first run: groups 1-2 trained by discarded weights) is kept aside, as valid JSON lines. No run
    # sampled a group 3: the stream ends at max_steps instead of sampling for Lightning's look-ahead.
    aside = [Rollout.from_json(line) for line in Path(f"{path}.untrained").read_text().splitlines()]
    assert [r.metadata["group_index"] for r in aside] == [1, 1, 2, 2]


VALIDATE_EVERY_STEP = dict(val_env_kwargs={"split": "heldout_trees"}, val_episodes=2)


def test_validation_by_epoch_runs_once_at_the_last_step(tiny_checkpoint, tmp_path):
    """With Lightning's default ``val_check_interval`` (1.0: at the end of each epoch) a configured validation
    used to never run: the online epoch was endless. The stream now ends at ``max_steps``, so the epoch ends at the
    last step and validates there, once."""
    trainer, data, batches = _fit(tiny_checkpoint, tmp_path, max_steps=2, generate_every=1, **VALIDATE_EVERY_STEP)
    scalars = _scalars(tmp_path / "tb", steps=True)
    assert [step for step, _ in scalars.get("val/rollout/success_rate", [])] == [2]
    assert trainer.global_step == 2 and len(batches) == 2 and data.groups_generated == 2


@pytest.mark.parametrize(("generate_every", "resume_at", "validate"),
                         [(1, 1, False), (2, 1, False), (2, 2, False), (2, 1, True)])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_checkpoint, tmp_path, generate_every, resume_at,
                                                          validate):
    """A run resumed from its checkpoint after step ``resume_at`` trains the same batches and ends with the same
    weights, to the bit, as the run that went on: the checkpoint carries the groups prefetched before it (trained
    as they were, not sampled again by newer weights) and the random states (:mod:`lit_echo.online.resume`).
    With ``generate_every=2`` a resume after step 1 lands inside a round, after step 2 at its start. With
    ``validate`` the runs sample validation rollouts after every step, between each checkpoint and the next
    training group."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def checkpoints():
        return [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)]

    def adapter(trainer):
        return {name: p.detach().clone() for name, p in trainer.lightning_module.named_parameters()
                if p.requires_grad}

    def stored():
        return [item.rollout for item in RolloutBuffer(tmp_path / "rollouts" / "rollouts-rank0.jsonl",
                                                       shuffle=False)]

    extra = dict(trainer_kwargs={"val_check_interval": 1}, **VALIDATE_EVERY_STEP) if validate else {}
    trainer, _, first = _fit(tiny_checkpoint, tmp_path, max_steps=4, generate_every=generate_every,
                             callbacks=checkpoints(), **extra)
    uninterrupted, buffer = adapter(trainer), stored()
    checkpoint = torch.load(tmp_path / "ckpt" / f"epoch=0-step={resume_at}.ckpt", weights_only=False)
    state = checkpoint["OnlineRolloutDataModule"]  # Lightning keeps a data module's state under its class name
    assert [r["metadata"]["group_index"] for g in state["prefetched"]["groups"] for r in g[:1]] == list(
        range(resume_at, resume_at + (1 if generate_every == 1 else 2 - resume_at % 2)))

    trainer, data, second = _fit(tiny_checkpoint, tmp_path, max_steps=4, generate_every=generate_every,
                                 callbacks=checkpoints(), ckpt_path=str(tmp_path / "ckpt" /
                                                                         f"epoch=0-step={resume_at}.ckpt"), **extra)
    assert data.groups_trained == 4
    assert [_rows(b) for b in second] == [_rows(b) for b in first[resume_at:]]
    resumed = adapter(trainer)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    assert stored() == buffer  # each trained group once, in order, as the uninterrupted run left it


@pytest.mark.parametrize("validation", ["environment", "buffer"])
def test_validation_does_not_move_the_training_stream(tiny_checkpoint, tmp_path, validation):
    """A run that validates after every step trains the same batches and ends with the same weights as one that
    never validates: validation rollouts are sampled on a random stream of their own, and the validation loaders
    (environment or offline buffer) have their own generator (starting a DataLoader iterator otherwise draws
    from the global stream)."""
    def weights(trainer):
        return {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters() if p.requires_grad}

    plain, _, plain_batches = _fit(tiny_checkpoint, tmp_path / "plain", max_steps=3)
    source = VALIDATE_EVERY_STEP if validation == "environment" else {"val_path": str(REPO / "data/sample/val.jsonl")}
    validating, _, batches = _fit(tiny_checkpoint, tmp_path / "validating", max_steps=3,
                                  trainer_kwargs={"val_check_interval": 1}, **source)
    assert [_rows(b) for b in batches] == [_rows(b) for b in plain_batches]
    a, b = weights(plain), weights(validating)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = _scalars(tmp_path / "validating" / "tb", steps=True)
    tag = "val/rollout/turns_mean" if validation == "environment" else "val/world/nll_observation"
    assert len(logged[tag]) == 3  # it did validate, after every step


def test_resume_on_another_number_of_ranks_samples_again_with_a_warning(tiny_checkpoint, tmp_path, caplog):
    """A checkpoint written by 2 ranks, read by 1 process: no rank's groups are taken for another's, and the run
    says it samples them again. (A 1-process checkpoint read by 2 ranks takes the same branch.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    _fit(tiny_checkpoint, tmp_path, max_steps=2, generate_every=2,
         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)])
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=1.ckpt", weights_only=False)["OnlineRolloutDataModule"]
    one = OnlineRolloutDataModule(env_class=GUESS)
    one.load_state_dict(state)
    assert one._prefetched is not None and one._prefetched.first_group == 1
    two_ranks = {k: v for k, v in state.items() if k != "prefetched"}
    two_ranks["prefetched_by_rank"] = [state["prefetched"], state["prefetched"]]
    with caplog.at_level("WARNING", logger="lit_echo"):
        one.load_state_dict(two_ranks)
    assert one._prefetched is None and one.groups_trained == 1
    assert "resuming on 1 rank(s) from a checkpoint written by 2" in caplog.text


def test_writing_checkpoints_does_not_change_the_run(tiny_checkpoint, tmp_path):
    """The grid's runs now write checkpoints (published runs did not): saving one only reads the random states,
    so a run with checkpoints ends with the same weights as one without."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def weights(trainer):
        return {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters() if p.requires_grad}

    plain, _, _ = _fit(tiny_checkpoint, tmp_path / "plain", max_steps=3)
    saving, _, _ = _fit(tiny_checkpoint, tmp_path / "saving", max_steps=3, callbacks=[
        ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)])
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
    a, b = weights(plain), weights(saving)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_online_recipe_runs_and_its_buffer_reads_back(tmp_path):
    """configs/tiny-online.yaml through the CLI (shortened), outputs under --trainer.default_root_dir, then
    RolloutDataModule(train_path=buffer dir)."""
    from lit_echo.cli import run

    run(["fit", "--config", str(REPO / "configs/tiny-online.yaml"), "--trainer.max_steps=2",
         "--trainer.val_check_interval=2", f"--trainer.default_root_dir={tmp_path}",
         f"--data.init_args.offline_path={REPO / 'data/sample/train.jsonl'}"])
    buffer_dir = tmp_path / "rollouts"
    raw = [json.loads(line) for line in (buffer_dir / "rollouts-rank0.jsonl").read_text().splitlines()]
    assert raw
    offline = RolloutDataModule(train_path=str(buffer_dir), tokenizer="tiny-random", shuffle=False, repeat=False,
                                batch_size=2, max_length=None)
    rows = [row for batch in offline.train_dataloader() for row in _rows(batch)]
    assert [(ids, roles) for ids, roles, _, _ in rows] == [(r["input_ids"], r["roles"]) for r in raw]
    scalars = _scalars(tmp_path / "lightning_logs")
    assert scalars.get("val/rollout/success_rate") and scalars.get("rollout/success_rate")


def test_textworld_recipe_is_a_valid_config():
    from lit_echo.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/textworld.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)


def test_every_data_option_has_help(capsys):
    """``lit-echo fit --data.help lit_echo.online.OnlineRolloutDataModule`` describes every option."""
    import inspect

    from lit_echo.cli import run

    with pytest.raises(SystemExit):
        run(["fit", "--data.help", "lit_echo.online.OnlineRolloutDataModule"])
    text = capsys.readouterr().out
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"^  --data\.(\w+)[^\n]*?(?: {2,}|\n)(.*?)(?=^  --|\Z)",
                                                         text, flags=re.DOTALL | re.MULTILINE)}
    names = list(inspect.signature(OnlineRolloutDataModule).parameters)
    assert sorted(blocks) == sorted(names)
    for name in names:
        description = " ".join(blocks[name].split()).split("(type:")[0].strip()
        assert len(description) > 10, (name, blocks[name])
