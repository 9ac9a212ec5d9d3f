"""``precision: auto``: the resolver's rule on both kinds of hardware, and the recipes that use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lit_echo import models
from lit_echo.cli import AutoPrecisionTrainer, run
from lit_echo.precision import native_bf16, resolve_precision

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("device,native,expected", [
    ("cpu", True, "bf16-mixed"),
    ("cpu", False, "32-true"),
    ("cuda", True, "bf16-mixed"),
    ("cuda", False, "16-mixed"),
    ("mps", False, "32-true"),
])
def test_auto_follows_native_bf16(device, native, expected):
    precision, reason = resolve_precision("auto", device, bf16_is_native=native)
    assert precision == expected and reason


@pytest.mark.parametrize("given", ["bf16-mixed", "32-true", 16, None])
def test_other_values_are_kept(given):
    assert resolve_precision(given, "cpu", bf16_is_native=False)[0] == given


def test_the_trainer_resolves_auto_on_this_machine(caplog):
    caplog.set_level("INFO", logger="lit_echo")
    trainer = AutoPrecisionTrainer(precision="auto", accelerator="cpu", devices=1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False)
    expected = "bf16-mixed" if native_bf16("cpu") else "32-true"
    assert trainer.precision == expected
    assert f"trainer.precision auto -> {expected}" in caplog.text


@pytest.mark.parametrize("recipe", ["demo.yaml", "shellworld-sft.yaml"])
def test_recipes_say_auto_and_parse(recipe, capsys):
    assert yaml.safe_load((REPO / "configs" / recipe).read_text())["trainer"]["precision"] == "auto"
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs" / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["precision"] == "auto"


def _fit_tiny(tiny_checkpoint, tmp_path, precision, dtype, callbacks=()):
    import lightning as L

    from lit_echo import EchoModule, RolloutDataModule

    torch.manual_seed(0)
    module = EchoModule(str(tiny_checkpoint), lora_rank=4, lr=5e-2, dtype=dtype)
    data = RolloutDataModule(str(REPO / "data/sample/train.jsonl"), tokenizer=str(tiny_checkpoint), batch_size=4,
                             max_length=256)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[Losses(), *callbacks])
    trainer.fit(module, data)
    return module, losses


def test_bf16_mixed_stores_the_frozen_linears_in_bf16_and_computes_the_same(tiny_checkpoint, tmp_path, caplog):
    """dtype auto under bf16-mixed: frozen linear weights (the tied head as its own copy) bf16; embeddings, norms
    and LoRA float32; the same losses and adapters as a float32 base under the same autocast (which casts exactly
    those weights at every forward). dtype float32 keeps them float32; 32-true casts nothing."""
    caplog.set_level("INFO", logger="lit_echo")
    stored, stored_losses = _fit_tiny(tiny_checkpoint, tmp_path / "a", "bf16-mixed", "auto")
    kept, kept_losses = _fit_tiny(tiny_checkpoint, tmp_path / "b", "bf16-mixed", "float32")
    assert "stored in bf16" in caplog.text
    head, embedding = models.output_head(stored.model), stored.model.get_input_embeddings()
    assert head.weight.dtype == torch.bfloat16 and embedding.weight.dtype == torch.float32
    for module in stored.model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.dtype == (torch.float32 if module.weight.requires_grad else torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in kept.model.parameters())
    assert len(stored_losses) == len(kept_losses) == 2
    assert stored_losses == kept_losses
    for (name, a), (_, b) in zip(models.trainable_parameters(stored.model), models.trainable_parameters(kept.model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    plain, _ = _fit_tiny(tiny_checkpoint, tmp_path / "c", "32-true", "auto")
    assert all(p.dtype == torch.float32 for p in plain.model.parameters())


def test_merged_export_of_a_bf16_stored_base_is_float32_and_keeps_the_update(tiny_checkpoint, tmp_path):
    """The LoRA update is merged in float32 (not rounded into bf16 weights): the merged checkpoint computes what the
    trained model computes in float32."""
    import copy

    from transformers import AutoModelForCausalLM

    from lit_echo.callbacks import AdapterExport

    module, _ = _fit_tiny(tiny_checkpoint, tmp_path, "bf16-mixed", "auto",
                          callbacks=[AdapterExport(dirpath="adapter", merged_dirpath="merged")])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    ids = torch.randint(3, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = copy.deepcopy(module.model).float().eval()
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
