"""lit_echo.models on real tiny Qwen2 / Llama checkpoints built offline (LoRA, QLoRA on CPU, chunked-head pieces)."""

from __future__ import annotations

import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lit_echo import models
from lit_echo.models import (
    adapters_disabled,
    build_model,
    export_adapter,
    hidden_states,
    output_head,
    parameter_counts,
    parameter_summary,
    trainable_parameters,
)
from lit_echo.tiny import save_tiny_checkpoint

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), architecture="llama")


@pytest.fixture(params=["qwen2", "llama"])
def checkpoint(request, tiny_checkpoint, llama_checkpoint):
    """Each architecture in turn: Qwen2 (q/k/v biases) and Llama (no biases)."""
    return {"qwen2": tiny_checkpoint, "llama": llama_checkpoint}[request.param]


def _perturb_lora_b(model, seed: int = 1, scale: float = 0.05) -> None:
    """LoRA B starts at zero (adapters are a no-op); give it values so the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def _batch(vocab_size: int, seed: int = 0):
    """A right-padded batch: ``[2, 10]`` ids and mask, the second row with 3 padding positions."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    return input_ids, attention_mask


def _lora_grads(model, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    """One training forward/backward through ``hidden_states`` + head; the LoRA gradients by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = output_head(model)(hidden_states(model, input_ids, attention_mask))  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    loss.backward()
    return {name: (p.grad.clone() if p.grad is not None else None) for name, p in trainable_parameters(model)}


def test_lora_trains_only_adapters_on_all_linear_layers(tiny_checkpoint):
    model = build_model(str(tiny_checkpoint), lora_rank=4, lora_alpha=8)
    assert isinstance(model, PeftModel)
    trainable = trainable_parameters(model)
    assert trainable and all("lora_A" in name or "lora_B" in name for name, _ in trainable)

    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == LINEAR_NAMES  # every linear layer of the body, and not lm_head

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    h, i, r = config.hidden_size, config.intermediate_size, 4
    # r * (in + out) for each adapted layer: q, k, v, o, gate, up, down
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    n_trainable, n_total = parameter_counts(model)
    assert n_trainable == per_layer * config.num_hidden_layers
    assert n_total == sum(p.numel() for p in model.parameters())
    assert parameter_summary(model).startswith(f"trainable params: {n_trainable:,} / {n_total:,}")


def test_explicit_target_modules(tiny_checkpoint):
    model = build_model(str(tiny_checkpoint), lora_rank=2, lora_target_modules=["q_proj", "v_proj"])
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_hidden_states_then_head_equals_model_logits(checkpoint):
    model = build_model(str(checkpoint), lora_rank=4)
    _perturb_lora_b(model)  # the LoRA layers must be on the hidden-state path, so make them matter
    model.eval()
    input_ids, attention_mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        hidden = hidden_states(model, input_ids, attention_mask)
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        head = output_head(model)
    assert hidden.shape == (2, 10, model.config.hidden_size)
    assert isinstance(head, torch.nn.Linear) and head.out_features == model.config.vocab_size
    torch.testing.assert_close(head(hidden), expected, rtol=1e-5, atol=1e-5)


def test_adapters_disabled_gives_base_model_logits(tiny_checkpoint):
    model = build_model(str(tiny_checkpoint), lora_rank=4)
    _perturb_lora_b(model)
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint)).eval()
    input_ids, attention_mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids, attention_mask=attention_mask).logits
        adapted = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with adapters_disabled(model):
            reference = output_head(model)(hidden_states(model, input_ids, attention_mask))
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters do change the policy
    torch.testing.assert_close(reference, base_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, adapted)  # and they are back on after the block


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft reading a renamed attribute
def test_export_adapter_round_trip(tiny_checkpoint, tmp_path):
    model = build_model(str(tiny_checkpoint), lora_rank=4)
    _perturb_lora_b(model)
    model.eval()
    path = export_adapter(model, tmp_path / "adapter")
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()

    fresh_base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint))
    reloaded = PeftModel.from_pretrained(fresh_base, path).eval()
    input_ids, attention_mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   model(input_ids=input_ids, attention_mask=attention_mask).logits)


def _build_4bit(path):
    torch.manual_seed(0)  # same LoRA A init for every model built this way
    return build_model(str(path), quantization="4bit", lora_rank=4)


def test_4bit_train_after_generate_gets_every_gradient(checkpoint):
    """Regression for the bitsandbytes CPU repacking bug (platform.md): generate, then train.

    Without the guard, Qwen2 raises "a view of a leaf Variable ... in-place operation" in the training forward;
    Llama trains with a cut graph: with fresh adapters (B = 0) most LoRA B matrices get no gradient, with
    perturbed adapters every gradient is non-zero but wrong. So check both, against a twin that never generated.
    """
    model = _build_4bit(checkpoint)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    input_ids, attention_mask = _batch(model.config.vocab_size)

    model.eval()
    generated = model.generate(input_ids=input_ids[:1], attention_mask=attention_mask[:1], max_new_tokens=3,
                               do_sample=False)
    assert generated.shape[1] > input_ids.shape[1]

    # Fresh adapters: lora_A gets no gradient by construction (B = 0), every lora_B must get one.
    grads = _lora_grads(model, input_ids, attention_mask)
    missing = [n for n, g in grads.items() if "lora_B" in n and (g is None or not g.abs().sum() > 0)]
    assert not missing, f"{len(missing)} LoRA B matrices got no gradient after generate: {missing[:3]}"

    # Perturbed adapters: every LoRA parameter gets a gradient, equal to a twin's that never ran inference.
    _perturb_lora_b(model)
    model.eval()
    model.generate(input_ids=input_ids[:1], attention_mask=attention_mask[:1], max_new_tokens=3, do_sample=False)
    grads = _lora_grads(model, input_ids, attention_mask)
    twin = _build_4bit(checkpoint)
    _perturb_lora_b(twin)
    expected = _lora_grads(twin, input_ids, attention_mask)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=name)


def test_4bit_generates_with_layer_sizes_not_multiple_of_64(tmp_path):
    """bitsandbytes' CPU inference repacking fails on such sizes; the guard keeps generate off that path."""
    path = save_tiny_checkpoint(tmp_path / "odd", hidden_size=96)
    model = _build_4bit(path)
    input_ids, attention_mask = _batch(model.config.vocab_size)
    model.eval()
    out = model.generate(input_ids=input_ids[:1], attention_mask=attention_mask[:1], max_new_tokens=3,
                         do_sample=False)
    assert out.shape[1] > input_ids.shape[1]


def test_guard_repairs_a_model_that_already_repacked(tiny_checkpoint, monkeypatch):
    """Called after inference already repacked the weights, the guard converts them back so training works."""
    real_guard = models.disable_cpu_inference_repacking
    monkeypatch.setattr(models, "disable_cpu_inference_repacking", lambda model: 0)
    model = _build_4bit(tiny_checkpoint)
    input_ids, attention_mask = _batch(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    packed = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith(
        "bitsandbytes") and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if not packed:
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights for inference")
    assert real_guard(model) == len(packed)
    grads = _lora_grads(model, input_ids, attention_mask)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_4bit_parameter_count_uses_unpacked_size(tiny_checkpoint):
    full = parameter_counts(build_model(str(tiny_checkpoint), lora_rank=4))
    quantized = parameter_counts(_build_4bit(tiny_checkpoint))
    assert quantized == full


def test_8bit_loads_and_trains_one_step(tiny_checkpoint):
    model = build_model(str(tiny_checkpoint), quantization="8bit", lora_rank=4)
    assert any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    _perturb_lora_b(model)
    input_ids, attention_mask = _batch(model.config.vocab_size)
    grads = _lora_grads(model, input_ids, attention_mask)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    params = [p for _, p in trainable_parameters(model)]
    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-3).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint):
    input_ids, attention_mask = None, None
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(str(checkpoint), lora_rank=4, gradient_checkpointing=checkpointing)
        _perturb_lora_b(model)
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == checkpointing for m in layers)
        if input_ids is None:
            input_ids, attention_mask = _batch(model.config.vocab_size)
        grads[checkpointing] = _lora_grads(model, input_ids, attention_mask)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_rejects_unknown_options(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantization: expected one of none, 4bit, 8bit, got 'int4'"):
        build_model(str(tiny_checkpoint), quantization="int4")
    with pytest.raises(ValueError, match="dtype: expected one of auto, float32, bfloat16, float16, got 'fp32'"):
        build_model(str(tiny_checkpoint), dtype="fp32")


def test_quantization_without_bitsandbytes_says_what_to_do(tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        build_model(str(tiny_checkpoint), quantization="4bit")


def test_dtype_option(tiny_checkpoint):
    model = build_model(str(tiny_checkpoint), dtype="bfloat16", lora_rank=2)
    assert output_head(model).weight.dtype == torch.bfloat16
