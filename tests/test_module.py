"""EchoModule with a real Lightning Trainer on the tiny model and the sample buffer."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_echo import EchoModule, RolloutDataModule
from lit_echo.callbacks import AdapterExport

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "data/sample/train.jsonl")
VAL = str(REPO / "data/sample/val.jsonl")


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def _fit(ckpt, root, max_steps, resume=None, callbacks=(), **module_kwargs):
    L.seed_everything(0)
    module = EchoModule(str(ckpt), lr=5e-3, lora_rank=8, **module_kwargs)
    data = RolloutDataModule(TRAIN, tokenizer=str(ckpt), batch_size=4, max_length=256, shuffle_buffer=16)
    recorder = LossRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[recorder, *callbacks])
    trainer.fit(module, data, ckpt_path=resume)
    return trainer, module, recorder.losses


def test_resume_equals_uninterrupted(tiny_checkpoint, tmp_path):
    _, _, full = _fit(tiny_checkpoint, tmp_path / "a", 6)
    trainer, _, first = _fit(tiny_checkpoint, tmp_path / "b", 3)
    ckpt = tmp_path / "b" / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])  # adapters only, no base
    assert saved["optimizer_states"] and saved["datamodule_state_dict"] if "datamodule_state_dict" in saved else True
    _, _, rest = _fit(tiny_checkpoint, tmp_path / "b", 6, resume=str(ckpt))
    assert len(full) == 6 and len(first) == 3 and len(rest) == 3
    assert first + rest == pytest.approx(full, rel=1e-5, abs=1e-6)
    assert len(set(full)) > 1  # the losses move, so the comparison means something


def test_exported_adapter_reproduces_logits(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, module, _ = _fit(tiny_checkpoint, tmp_path, 2, callbacks=[AdapterExport("adapter")])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    ids = torch.randint(3, 500, (2, 24))
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        got = reloaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)  # training changed the adapters


def test_validation_measures_world_model_and_learns(tiny_checkpoint, tmp_path):
    L.seed_everything(0)
    module = EchoModule(str(tiny_checkpoint), lr=1e-2, lora_rank=16, world_coef=1.0)
    data = RolloutDataModule(TRAIN, VAL, tokenizer=str(tiny_checkpoint), batch_size=8, max_length=256)
    trainer = L.Trainer(accelerator="cpu", max_steps=24, val_check_interval=12, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    assert 0.0 <= before["val/world_acc"] <= 1.0
    assert after["val/world_nll"] < before["val/world_nll"] - 0.2


def test_nonfinite_loss_is_skipped_then_stops(tiny_checkpoint, tmp_path):
    from lit_echo.module import NonFiniteLossError

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx in (1, 3, 4):
                batch["advantages"][:] = float("nan")

    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        _fit(tiny_checkpoint, tmp_path, 8, callbacks=[Poison()], max_nonfinite_steps=2)


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import lightning as L, torch
    from lit_echo import EchoModule, RolloutDataModule

    class GradDump(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0 and trainer.is_global_zero:
                grads = {n: p.grad.double().sum().item() for n, p in pl_module.model.named_parameters()
                         if p.grad is not None}
                json.dump(grads, open(sys.argv[4], "w"))

    ckpt, train, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    L.seed_everything(0)
    module = EchoModule(ckpt, lora_rank=4, gradient_clip_val=None, policy_agg="token_mean", world_norm="token_mean",
                        world_coef=0.3)
    torch.manual_seed(1)
    for name, p in module.model.named_parameters():  # non-zero LoRA B so every adapter gets a gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    data = RolloutDataModule(train, tokenizer=ckpt, batch_size=8 // devices, max_length=256, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[GradDump()])
    trainer.fit(module, data)
""")


def test_ddp_two_processes_match_one_process_gradients(tiny_checkpoint, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "MASTER_PORT": str(31000 + os.getpid() % 1000)}
    out = {}
    for devices in (1, 2):
        out[devices] = tmp_path / f"grads{devices}.json"
        subprocess.run([sys.executable, str(script), str(tiny_checkpoint), TRAIN, str(devices), str(out[devices])],
                       check=True, timeout=300, env=env, cwd=tmp_path)
    one, two = (json.loads(out[d].read_text()) for d in (1, 2))
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-7), name


def test_paw_options_train_and_bad_combination_is_rejected(tiny_checkpoint, tmp_path):
    _, module, losses = _fit(tiny_checkpoint, tmp_path, 2, paw_select_fraction=0.75, paw_reward_adaptive=True,
                             world_coef=1.0, kl_coef=0.1)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ValueError, match="paw_select_fraction needs world_norm"):
        EchoModule(str(tiny_checkpoint), paw_select_fraction=0.75, world_norm="token_mean")
