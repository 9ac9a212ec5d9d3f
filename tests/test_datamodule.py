"""RolloutDataModule on the sample buffer: messages records through the tokenizer, buffer and collation."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_echo import Role, RolloutDataModule
from lit_echo.chat import role_spans_text

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data/sample/train.jsonl"


def _records():
    return [json.loads(line) for line in TRAIN.read_text(encoding="utf-8").splitlines()]


def test_collated_roles_decode_back_to_the_messages(tiny_checkpoint):
    data = RolloutDataModule(str(TRAIN), tokenizer=str(tiny_checkpoint), batch_size=4, max_length=None,
                             shuffle=False, repeat=False)
    data.setup("fit")
    tok = data.tokenizer
    records = _records()
    seen = 0
    for batch in data.train_dataloader():
        for i in range(batch["input_ids"].shape[0]):
            record = records[seen]
            n = int(batch["attention_mask"][i].sum())
            ids, roles = batch["input_ids"][i, :n].tolist(), batch["roles"][i, :n].tolist()
            spans = role_spans_text(tok, ids, roles)
            by_role = {r: [text for role, text in spans if role == r] for r in Role}
            tools = [m for m in record["messages"] if m["role"] == "tool"]
            assistants = [m for m in record["messages"] if m["role"] == "assistant"]
            # One OBSERVATION span per non-empty tool body, one WARNING span per warning, in order.
            assert by_role[Role.OBSERVATION] == [m["content"] for m in tools if m["content"]]
            assert by_role[Role.WARNING] == [m["warning"] for m in tools if m.get("warning")]
            assert by_role[Role.ACTION] == [m["content"] + "<|im_end|>" for m in assistants]
            assert batch["rewards"][i].item() == record["reward"] and batch["group_ids"][i] == record["group_id"]
            seen += 1
        if seen >= 40:
            break
    assert seen >= 40


def test_grpo_advantages_from_groups_and_val_in_memory(tiny_checkpoint):
    data = RolloutDataModule(str(TRAIN), str(REPO / "data/sample/val.jsonl"), tokenizer=str(tiny_checkpoint),
                             batch_size=8, shuffle=False, repeat=False, grpo_scale_by_std=False)
    data.setup("fit")
    assert len(data.val_rollouts) == 60
    batch = next(iter(data.train_dataloader()))
    records = _records()[:8]
    for i, record in enumerate(records):
        group = [r["reward"] for r in records if r["group_id"] == record["group_id"]]
        assert batch["advantages"][i].item() == record["reward"] - sum(group) / len(group)  # Dr. GRPO
    val = next(iter(data.val_dataloader()))
    assert val["input_ids"].shape[0] == 8 and torch.isnan(val["old_logprobs"]).all()


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("trainer_kwargs, repeat, raises", [
    ({}, True, True),  # max_epochs alone: the first epoch of an endless stream never ends
    ({"max_epochs": 2}, True, True),
    ({"max_steps": 3}, True, False),
    ({"max_epochs": 1, "limit_train_batches": 4}, True, False),
    ({"max_time": "00:00:05:00"}, True, False),
    ({"fast_dev_run": True}, True, False),
    ({"max_epochs": 2}, False, False),
])
def test_endless_stream_needs_a_stopping_point_at_setup(trainer_kwargs, repeat, raises):
    data = RolloutDataModule(str(TRAIN), batch_size=2, repeat=repeat)
    data.trainer = _trainer(**trainer_kwargs)  # what Trainer.fit does before calling setup
    if raises:
        with pytest.raises(ValueError, match=r"data.repeat=true .* set trainer.max_steps"):
            data.setup("fit")
    else:
        data.setup("fit")


def test_max_length_below_every_prompt_fails_at_the_first_batch(tiny_checkpoint):
    data = RolloutDataModule(str(TRAIN), tokenizer=str(tiny_checkpoint), batch_size=4, max_length=24,
                             shuffle=False, repeat=False)
    with pytest.raises(ValueError, match=r"data.max_length=24 cuts every rollout .* shortest prompt here is \d+"):
        next(iter(data.train_dataloader()))


FIT_SCRIPT = textwrap.dedent("""
    import sys
    import lightning as L
    from lit_echo import EchoModule, RolloutDataModule
    ckpt, buffer = sys.argv[1], sys.argv[2]
    data = RolloutDataModule(buffer, tokenizer=ckpt, batch_size=2, on_bad_record="skip", repeat=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(EchoModule(ckpt, lora_rank=4), data)
""")


@pytest.mark.slow
def test_fit_on_an_all_bad_buffer_stops_with_a_clear_error(tiny_checkpoint, tmp_path):
    """Was an endless loop at 100% CPU ignoring SIGTERM, with millions of warnings; the timeout only ends that."""
    buffer = tmp_path / "bad.jsonl"
    buffer.write_text('{"input_ids": [1, 99999], "roles": [0, 1]}\n' * 3000)  # every id beyond the vocabulary
    proc = subprocess.run([sys.executable, "-c", FIT_SCRIPT, str(tiny_checkpoint), str(buffer)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    assert "EmptyStreamError: no usable rollout" in proc.stderr and "every record of this reader's" in proc.stderr
    assert proc.stderr.count("skipping bad record") <= 10


def test_no_validation_buffer_skips_validation_without_lightning_warning(tiny_checkpoint, tmp_path):
    """Without val_path the module returns Lightning's empty list (skip validation); Lightning's warning that the
    list is empty ("Please make sure this was your intention") is not shown: it is the intention."""
    import warnings

    from lit_echo import EchoModule

    data = RolloutDataModule(str(TRAIN), tokenizer=str(tiny_checkpoint), batch_size=4, max_length=128)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(EchoModule(str(tiny_checkpoint), lora_rank=4, lr=1e-3), datamodule=data)
    assert trainer.global_step == 1 and data.val_dataloader() == []
    assert not [w for w in caught if "across ranks is zero" in str(w.message)]
