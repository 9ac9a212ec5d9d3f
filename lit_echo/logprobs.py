"""Per-token log-probs of target tokens without materialising the full [B, T, V] logits.

``chunked_logprobs`` runs the LM head over chunks of the flattened positions. For a linear head (an ``nn.Linear``,
a weight ``[V, H]`` or a ``(weight, bias)`` pair) a custom autograd function keeps only per-token results: in the
forward it also computes the gradient direction for ``hidden`` (``d logp_t / d h_t = s_t (W[y_t] - p_t^T W)``, with
``s_t`` the inverse temperature), which is exact and costs one matmul per chunk; only when the head itself needs a
gradient (full fine-tuning) does the backward recompute each chunk's logits. Peak memory is about one chunk of
float32 logits (``chunk_size * V * 4`` bytes, twice during the head-gradient backward) instead of several copies of
``B * T * V``. Any other head module (LoRA-wrapped, quantized) goes through ``torch.utils.checkpoint`` per chunk,
which bounds memory the same way at the cost of a recomputed forward.

Softmax is always taken in float32, whatever the dtype of ``hidden`` and of the head, and the head runs in the
ambient autocast dtype when autocast is on (as ``lm_head(hidden)`` would).

Temperature (method.md section 3): positions where ``temperature_mask`` is True (the ACTION targets, sampled at
that temperature) use ``logits / temperature``; all others (observations) use T = 1. With ``temperature_mask=None``
the temperature applies everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LMHead = nn.Module | torch.Tensor | tuple  # nn.Linear / any module, weight [V, H], or (weight [V, H], bias [V] | None)

DEFAULT_CHUNK_SIZE = 256


def chunked_logprobs(hidden: torch.Tensor, lm_head: LMHead, targets: torch.Tensor, *, temperature: float = 1.0,
                     temperature_mask: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     return_entropy: bool = False):
    """``log softmax(lm_head(hidden) / s)[targets]`` chunk by chunk.

    Args:
        hidden: [B, T, H] final hidden states (any float dtype).
        lm_head: ``nn.Linear`` or another module mapping [N, H] -> [N, V]; or weight [V, H]; or (weight, bias).
        targets: [B, T] long target token ids. Negative ids (e.g. -100 padding) give log-prob 0 and no gradient.
        temperature: sampling temperature; applied where ``temperature_mask`` is True (everywhere when None).
        temperature_mask: [B, T] bool, positions whose log-prob uses ``temperature`` (ACTION targets).
        chunk_size: positions per chunk; peak extra memory is about ``chunk_size * V * 4`` bytes.
        return_entropy: also return the entropy (nats) of the same distribution, detached (for logging and PaW
            selection; it carries no gradient).
    Returns:
        logprobs [B, T] float32 (gradient flows to ``hidden`` and the head), and entropy [B, T] float32 if asked.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden [B, T, H] and targets [B, T]: got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    batch, width, size = hidden.shape
    flat_hidden = hidden.reshape(-1, size)  # [N, H]
    flat_targets = targets.reshape(-1)  # [N]
    inv_temp = _inverse_temperature(targets, temperature, temperature_mask).reshape(-1)  # [N]
    weight, bias, module = _resolve_head(lm_head)

    if module is not None:
        logp, entropy = _checkpointed(module, flat_hidden, flat_targets, inv_temp, chunk_size, return_entropy)
    else:
        params = [flat_hidden, weight] + ([bias] if bias is not None else [])
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            logp, entropy = _ChunkedLinearLogprobs.apply(flat_hidden, weight, bias, flat_targets, inv_temp,
                                                         chunk_size, return_entropy)
        else:
            with torch.no_grad():
                logp, entropy, _ = _linear_forward(flat_hidden, weight, bias, flat_targets, inv_temp, chunk_size,
                                                   return_entropy, want_hidden_grad=False)
    logp = logp.reshape(batch, width)
    if return_entropy:
        return logp, entropy.reshape(batch, width)
    return logp


def naive_logprobs(hidden: torch.Tensor, lm_head: LMHead, targets: torch.Tensor, *, temperature: float = 1.0,
                   temperature_mask: torch.Tensor | None = None, chunk_size: int | None = None,
                   return_entropy: bool = False):
    """Reference: full [B, T, V] float32 logits, ``log_softmax``, gather. Same signature (``chunk_size`` unused)."""
    weight, bias, module = _resolve_head(lm_head)
    logits = module(hidden) if module is not None else F.linear(hidden, weight, bias)  # [B, T, V]
    inv_temp = _inverse_temperature(targets, temperature, temperature_mask)  # [B, T]
    log_probs = torch.log_softmax(logits.float() * inv_temp[..., None], dim=-1)  # [B, T, V]
    valid = targets >= 0
    logp = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)  # [B, T]
    logp = torch.where(valid, logp, 0.0)
    if return_entropy:
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B, T]
        return logp, entropy
    return logp


def _inverse_temperature(targets: torch.Tensor, temperature: float, temperature_mask: torch.Tensor | None):
    """[B, T] float32: 1 / temperature where the mask is True (everywhere without a mask), 1 elsewhere."""
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    inv = torch.full(targets.shape, 1.0 / temperature, dtype=torch.float32, device=targets.device)
    if temperature_mask is not None:
        inv = torch.where(temperature_mask.bool(), inv, 1.0)
    return inv


def _resolve_head(lm_head: LMHead):
    """(weight, bias, None) for a linear head, (None, None, module) for any other module."""
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None, None
    if isinstance(lm_head, tuple):
        weight, bias = lm_head
        return weight, bias, None
    if type(lm_head) is nn.Linear:  # subclasses (quantized, LoRA) may not compute x @ W.T + b from .weight
        return lm_head.weight, lm_head.bias, None
    if isinstance(lm_head, nn.Module):
        return None, None, lm_head
    raise TypeError(f"lm_head: expected nn.Module, weight tensor [V, H] or (weight, bias), got {type(lm_head)}")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would run in: the autocast dtype if autocast is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_log_softmax(hidden_chunk, weight, bias, inv_temp_chunk):
    """[n, V] float32 log-softmax of ``(hidden_chunk @ weight.T + bias) * inv_temp`` (written in place)."""
    logits = F.linear(hidden_chunk, weight, bias).float()  # [n, V]
    logits.mul_(inv_temp_chunk[:, None])
    logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    return logits


def _linear_forward(hidden, weight, bias, targets, inv_temp, chunk_size, return_entropy, want_hidden_grad):
    """Per-token log-probs [N], entropy [N] (or empty) and, if asked, d logp / d hidden [N, H] float32."""
    num, _ = hidden.shape
    dtype = _compute_dtype(hidden, weight)
    weight_c = weight.to(dtype)  # [V, H]
    bias_c = bias.to(dtype) if bias is not None else None  # [V]
    valid = targets >= 0  # [N]
    safe_targets = targets.clamp_min(0)  # [N]
    logp = torch.empty(num, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(num if return_entropy else 0, dtype=torch.float32, device=hidden.device)
    hidden_grad = torch.empty((num, weight.shape[1]) if want_hidden_grad else (0,), dtype=torch.float32,
                              device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, num, chunk_size):
            stop = min(start + chunk_size, num)
            log_probs = _chunk_log_softmax(hidden[start:stop].to(dtype), weight_c, bias_c, inv_temp[start:stop])
            target_chunk = safe_targets[start:stop]  # [n]
            logp[start:stop] = log_probs.gather(1, target_chunk[:, None]).squeeze(1)
            probs = None
            if return_entropy:
                probs = log_probs.exp()  # [n, V]
                entropy[start:stop] = -(probs * log_probs).sum(-1)
            if want_hidden_grad:
                probs = log_probs.exp_() if probs is None else probs  # [n, V] softmax
                expected_row = (probs.to(dtype) @ weight_c).float()  # [n, H] p^T W
                direction = weight_c[target_chunk].float() - expected_row  # [n, H] W[y] - p^T W
                scale = inv_temp[start:stop] * valid[start:stop]  # [n]
                hidden_grad[start:stop] = direction * scale[:, None]
            del log_probs, probs
    logp = torch.where(valid, logp, 0.0)
    return logp, entropy, hidden_grad


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Chunked log-probs through a linear head; see the module docstring for the memory argument."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, chunk_size, return_entropy):
        want_hidden_grad = ctx.needs_input_grad[0]
        logp, entropy, hidden_grad = _linear_forward(hidden, weight, bias, targets, inv_temp, chunk_size,
                                                     return_entropy, want_hidden_grad)
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(hidden_grad, *((hidden, weight, bias, targets, inv_temp) if head_grad else ()))
        ctx.head_grad = head_grad
        ctx.has_bias = bias is not None
        ctx.chunk_size = chunk_size
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        saved = ctx.saved_tensors
        hidden_grad = saved[0]
        grad_logp = grad_logp.float()  # [N]
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (hidden_grad * grad_logp[:, None]).to(ctx.hidden_dtype)  # [N, H]
        if ctx.head_grad:
            hidden, weight, bias, targets, inv_temp = saved[1:]
            grad_weight, grad_bias = _head_backward(hidden, weight, bias if ctx.has_bias else None, targets,
                                                    inv_temp, grad_logp, ctx.chunk_size)
            grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = grad_bias.to(bias.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _head_backward(hidden, weight, bias, targets, inv_temp, grad_logp, chunk_size):
    """Recompute each chunk's softmax; accumulate d/dW and d/db in float32."""
    dtype = _compute_dtype(hidden, weight)
    weight_c = weight.to(dtype)  # [V, H]
    bias_c = bias.to(dtype) if bias is not None else None
    valid = targets >= 0
    safe_targets = targets.clamp_min(0)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, H]
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)  # [V]
    scale_all = grad_logp * inv_temp * valid  # [N] d loss / d logp * d (scaled logits) / d logits
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:stop].to(dtype)  # [n, H]
            grad_logits = _chunk_log_softmax(hidden_chunk, weight_c, bias_c, inv_temp[start:stop]).exp_()  # [n, V]
            scale = scale_all[start:stop]  # [n]
            grad_logits.mul_(-scale[:, None])  # -s g p
            rows = torch.arange(stop - start, device=hidden.device)
            grad_logits[rows, safe_targets[start:stop]] += scale  # + s g onehot(y)
            grad_weight += (grad_logits.to(dtype).T @ hidden_chunk).float()
            grad_bias += grad_logits.sum(0)
            del grad_logits
    return grad_weight, grad_bias


def _checkpointed(module, hidden, targets, inv_temp, chunk_size, return_entropy):
    """Generic heads: one ``torch.utils.checkpoint`` per chunk, so only one chunk's logits live at a time."""
    valid = targets >= 0
    safe_targets = targets.clamp_min(0)
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        args = (module, hidden[start:stop], safe_targets[start:stop], inv_temp[start:stop], return_entropy)
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(_module_chunk, *args, use_reentrant=False)
        else:
            logp, entropy = _module_chunk(*args)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.where(valid, torch.cat(logps), 0.0)
    return logp, torch.cat(entropies)


def _module_chunk(module, hidden_chunk, target_chunk, inv_temp_chunk, return_entropy):
    log_probs = torch.log_softmax(module(hidden_chunk).float() * inv_temp_chunk[:, None], dim=-1)  # [n, V]
    logp = log_probs.gather(1, target_chunk[:, None]).squeeze(1)  # [n]
    if return_entropy:
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)  # [n]
    else:
        entropy = log_probs.new_empty(0)
    return logp, entropy
