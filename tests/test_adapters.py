"""Portable adapters: hub id of the base, tokenizer beside the adapter, merged export, plain peft round trips."""

import json
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_echo import EchoModule, RolloutDataModule
from lit_echo.callbacks import AdapterExport
from lit_echo.cli import main
from lit_echo.models import build_model, export_adapter, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))  # [2, 12]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits  # [2, 12, V]


def _fit(module, root: Path, max_steps: int, callbacks=(), ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    data = RolloutDataModule(str(REPO / "data/sample/train.jsonl"), tokenizer=module.hparams.model_name_or_path,
                             batch_size=4, max_length=256)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
                        **trainer_kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_adapter_export_is_portable_and_merged_model_matches(tiny_checkpoint, tmp_path):
    """A real fit writes adapter + tokenizer + merged model; plain peft and plain transformers give its logits."""
    base_dir = str(tiny_checkpoint)
    module = EchoModule(base_dir, lora_rank=4, lr=5e-2)
    _fit(module, tmp_path, max_steps=2, enable_checkpointing=False,
         callbacks=[AdapterExport(dirpath="adapter", merged_dirpath="merged")])
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir  # what the user gave
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer("ls -la /tmp").input_ids == AutoTokenizer.from_pretrained(base_dir)("ls -la /tmp").input_ids
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(base_dir).chat_template

    ids = _ids(module.model.config.vocab_size)
    trained = _logits(module.model, ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(base_dir), ids)
    assert (trained - base).abs().max() > 1e-3  # training moved the adapters: the comparisons below can fail
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    torch.testing.assert_close(_logits(reloaded, ids), trained)
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), trained, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(merged)("ls").input_ids == tokenizer("ls").input_ids


def _perturbed(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_builtin_base_is_named_by_its_hub_id_and_round_trips_through_plain_peft(tmp_path):
    """smollm2-135m-instruct exports as HuggingFaceTB/SmolLM2-135M-Instruct, never the local cache path."""
    from lit_echo.pretrained import load_tokenizer

    torch.manual_seed(0)
    model = _perturbed(build_model("smollm2-135m-instruct", lora_rank=2, lora_target_modules=["q_proj", "v_proj"]))
    path = export_adapter(model, tmp_path / "adapter", base_model_name_or_path="smollm2-135m-instruct",
                          tokenizer=load_tokenizer("smollm2-135m-instruct"))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"

    # Plain peft on the local copy of the same base weights (no network here).
    local_base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    reloaded = PeftModel.from_pretrained(local_base, path)
    assert reloaded.peft_config["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_lit_echo_export_merges_an_adapter_directory(tiny_checkpoint, tmp_path):
    torch.manual_seed(0)
    model = _perturbed(build_model(str(tiny_checkpoint), lora_rank=4))
    export_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_checkpoint))
    main(["export", "--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"),
          "--out", str(tmp_path / "merged")])
    ids = _ids(model.config.vocab_size)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template


def test_lit_echo_export_names_a_wrong_adapter_directory(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a mistake in the input: one line, exit status 2
        main(["export", "--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "merged")])
    assert exit_info.value.code == 2
    assert re.search(r"^lit-echo: error: --adapter='.*nowhere' does not exist", capsys.readouterr().err, re.M)


def _missing_key_warnings(records) -> list[str]:
    return [str(w.message) for w in records if "keys" in str(w.message).lower() or "missing" in str(w.message)]


def test_checkpoints_load_without_warnings_about_the_frozen_base(tiny_checkpoint, tmp_path):
    module = EchoModule(str(tiny_checkpoint), lora_rank=4, lr=5e-2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(module, tmp_path, max_steps=2, callbacks=[checkpoint])
    saved = {name: p.detach().clone() for name, p in module.model.named_parameters() if p.requires_grad}

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loaded = EchoModule.load_from_checkpoint(checkpoint.last_model_path)
    assert not _missing_key_warnings(records)
    for name, p in loaded.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, saved[name])
    with warnings.catch_warnings(record=True) as records:  # resuming a fit reads the same checkpoint
        warnings.simplefilter("always")
        trainer = _fit(EchoModule(str(tiny_checkpoint), lora_rank=4, lr=5e-2), tmp_path, max_steps=3,
                       enable_checkpointing=False, ckpt_path=checkpoint.last_model_path)
    assert trainer.global_step == 3 and not _missing_key_warnings(records)


def test_checkpoint_of_other_lora_settings_is_refused(tiny_checkpoint, tmp_path):
    module = EchoModule(str(tiny_checkpoint), lora_rank=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(module, tmp_path, max_steps=1, callbacks=[checkpoint])
    with pytest.raises((KeyError, RuntimeError), match="adapter tensors"):
        EchoModule.load_from_checkpoint(checkpoint.last_model_path, lora_target_modules=["q_proj", "o_proj", "up_proj"])


def test_missing_init_adapter_is_named_before_the_model_loads(tmp_path):
    # The base does not exist either: the error must be about init_adapter, raised before any loading.
    with pytest.raises(FileNotFoundError, match=r"model\.init_adapter='.*no-adapter'.* does not exist"):
        EchoModule(str(tmp_path / "no-model"), init_adapter=str(tmp_path / "no-adapter"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.init_adapter=.* has no adapter_model\.safetensors"):
        EchoModule(str(tmp_path / "no-model"), init_adapter=str(tmp_path / "empty"))
