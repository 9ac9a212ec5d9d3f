"""Attention for one-token decode steps on CPU: grouped-query attention without copying the KV cache.

Decoding one token per row reads the whole KV cache every step. Hugging Face's ``eager`` attention first repeats
each key/value head to every query head of its group (``repeat_kv``: a copy of the cache, every layer, every
step), and PyTorch's CPU SDPA kernel is slow for a single query in bf16. :func:`grouped_attention` computes the
same softmax attention with the query heads of a group stacked into one matrix, so each key/value head is read
in place:

    q [n, H, q, d] -> [n, Hkv, g*q, d];  scores = q k^T * scale -> [n, Hkv, g*q, C];  out = softmax(scores + mask) v

with ``g = H / Hkv`` query heads per key/value head (the head order of ``repeat_kv``: query head ``h`` reads
key/value head ``h // g``). Measured on SmolLM2-135M + LoRA, 8 rows, 400 cached tokens, one thread of a 2-core
avx512_bf16 CPU: a decode step takes 63-76 ms with bf16 weights (SDPA 138-152 ms, eager 82-105 ms) and
113-114 ms in float32 (SDPA 113-128 ms). On a 2-core AVX2-only CPU in float32 the two are level (grouped
0.97-1.05x SDPA's speed over three paired runs of 10 rounds, 400 and 800 cached tokens); ``benchmarks/decode_step.py``
re-measures it.

:func:`decode_attention` is a context manager that switches a model to this implementation for the forwards
inside it (the mask follows: an additive float mask, as for ``eager``). Anything this function does not model
(attention logit soft-capping, sliding windows, attention sinks, dropout) goes to the model's own SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

NAME = "lit_echo_grouped"
_registered = False


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs
                      ) -> tuple[torch.Tensor, None]:
    """Softmax attention in Hugging Face's attention-interface form; returns ``(out [n, q, H, d], None)``.

    ``query`` ``[n, H, q, d]``; ``key``/``value`` ``[n, Hkv, C, d]``; ``attention_mask`` ``[n, 1, q, >=C]``
    additive (0 where attended, a large negative number elsewhere) or None.
    """
    special = (kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None
               or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None
               or (dropout > 0 and module.training))
    if special:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    n, heads, q, d = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(n, kv_heads, group * q, d), key.transpose(2, 3)) * scaling  # [n,Hkv,gq,C]
    if attention_mask is not None:
        scores = (scores.view(n, kv_heads, group, q, columns)
                  + attention_mask[:, :, None, :, :columns]).view(n, kv_heads, group * q, columns)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [n, Hkv, g*q, C]
    out = torch.matmul(probs, value)  # [n, Hkv, g*q, d]
    return out.view(n, heads, q, d).transpose(1, 2).contiguous(), None  # [n, q, H, d]


def register() -> str:
    """Register :func:`grouped_attention` (and the additive mask it reads) with transformers; its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(NAME, grouped_attention)
        AttentionMaskInterface.register(NAME, eager_mask)
        _registered = True
    return NAME


def use_grouped_decode(model: torch.nn.Module) -> bool:
    """The default rule: grouped decode attention on CPU for models running ``sdpa`` or ``eager`` attention
    (measured faster there, see the module docstring); GPUs keep their own kernels (not measured here)."""
    from lit_echo.models import _causal_lm

    config = _causal_lm(model).config
    device = model.get_input_embeddings().weight.device
    return device.type == "cpu" and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


@contextlib.contextmanager
def decode_attention(model: torch.nn.Module, implementation: str | None = None) -> Iterator[None]:
    """Run the forwards inside with :func:`grouped_attention` (or the Hugging Face attention ``implementation``
    named, e.g. ``"eager"``); the model's own implementation is restored after."""
    from lit_echo.models import _causal_lm

    config = _causal_lm(model).config
    previous = config._attn_implementation
    config._attn_implementation = register() if implementation is None else implementation
    try:
        yield
    finally:
        config._attn_implementation = previous
