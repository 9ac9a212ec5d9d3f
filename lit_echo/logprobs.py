"""Per-token log-probs of target tokens without materialising the full [B, T, V] logits.

``chunked_logprobs`` runs the LM head over chunks of the flattened positions. For a linear head (an ``nn.Linear``,
a weight ``[V, H]`` or a ``(weight, bias)`` pair) a custom autograd function keeps only per-token results. Its
forward also computes the gradient direction for ``hidden``, ``d logp_t / d h_t = s_t (W[y_t] - p_t^T W)`` (``s_t``
the inverse temperature, ``p_t`` the softmax), which is exact and costs one matmul per chunk, so a frozen head
(LoRA) needs no recomputation at all. When the head itself needs a gradient (full fine-tuning) the backward
recomputes each chunk's logits once: four head matmuls instead of the naive three, in exchange for memory. Each
chunk's softmax is computed in place in one float32 buffer, so peak extra memory is about one chunk of logits
(``chunk_size * V * 4`` bytes) instead of several ``B * T * V`` tensors; the parameter gradients themselves
(``V * H``) are the same for every method. Any other head module (LoRA-wrapped, quantized) goes through
``torch.utils.checkpoint`` per chunk, which bounds memory the same way at the cost of a recomputed forward.

Softmax is always taken in float32, whatever the dtype of ``hidden`` and of the head, and the head runs in the
ambient autocast dtype when autocast is on (as ``lm_head(hidden)`` would).

Temperature (docs/method.md §3.4): positions where ``temperature_mask`` is True (the ACTION targets, sampled at
that temperature) use ``logits / temperature``; all others (observations) use T = 1. With ``temperature_mask=None``
the temperature applies everywhere.

``target_logprobs`` runs the head only where the loss reads a log-prob (ACTION, OBSERVATION and WARNING targets):
the prompt, the chat-template scaffolding and the padding never reach the ``[N, V]`` matmul and softmax.
:func:`lit_echo.models.causal_lm_logprobs` does the whole job for a Hugging Face causal LM and a collated batch
(the target shift, the action temperature), so :func:`lit_echo.losses.echo_loss` can be used without the
LightningModule; it lives with the model code because this module knows no model library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_echo.roles import Role

LMHead = nn.Module | torch.Tensor | tuple  # nn.Linear / any module, weight [V, H], or (weight [V, H], bias [V] | None)

# chunk_size=None picks the rows per chunk so that one chunk of float32 logits is about 64 MiB.
CHUNK_ELEMENTS = 2**24


def default_chunk_size(vocab_size: int) -> int:
    """Positions per LM-head chunk so that one chunk's float32 logits take about ``CHUNK_ELEMENTS`` elements."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def chunked_logprobs(hidden: torch.Tensor, lm_head: LMHead, targets: torch.Tensor, *, temperature: float = 1.0,
                     temperature_mask: torch.Tensor | None = None, chunk_size: int | None = None,
                     return_entropy: bool = False):
    """``log softmax(lm_head(hidden) / s)[targets]`` chunk by chunk.

    Args:
        hidden: [B, T, H] final hidden states (any float dtype).
        lm_head: ``nn.Linear`` or another module mapping [N, H] -> [N, V]; or weight [V, H]; or (weight, bias).
        targets: [B, T] long target token ids. Negative ids (e.g. -100 padding) give log-prob 0 and no gradient.
        temperature: sampling temperature; applied where ``temperature_mask`` is True (everywhere when None).
        temperature_mask: [B, T] bool, positions whose log-prob uses ``temperature`` (ACTION targets).
        chunk_size: positions per chunk; peak extra memory is about one chunk of float32 logits,
            ``chunk_size * V * 4`` bytes (up to three with ``return_entropy``). None: ``CHUNK_ELEMENTS // V`` positions
            (64 MiB of logits).
        return_entropy: also return the entropy (nats) of the same distribution, detached (for logging and PaW
            selection; it carries no gradient).
    Returns:
        logprobs [B, T] float32 (gradient flows to ``hidden`` and the head), and entropy [B, T] float32 if asked.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden [B, T, H] and targets [B, T]: got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    batch, width, size = hidden.shape
    weight, bias, module = _resolve_head(lm_head)
    if chunk_size is None:
        vocab = weight.shape[0] if weight is not None else _module_vocab(module, hidden)
        chunk_size = default_chunk_size(vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, size)  # [N, H]
    flat_targets = targets.reshape(-1)  # [N]
    inv_temp = _inverse_temperature(targets, temperature, temperature_mask).reshape(-1)  # [N]

    if module is not None:
        logp, entropy = _checkpointed(module, flat_hidden, flat_targets, inv_temp, chunk_size, return_entropy)
    else:
        params = [flat_hidden, weight] + ([bias] if bias is not None else [])
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            logp, entropy = _ChunkedLinearLogprobs.apply(flat_hidden, weight, bias, flat_targets, inv_temp,
                                                         chunk_size, return_entropy)
        else:
            with torch.no_grad():
                logp, entropy, _, _ = _linear_forward(flat_hidden, weight, bias, flat_targets, inv_temp, chunk_size,
                                                   return_entropy, want_hidden_grad=False)
    logp = logp.reshape(batch, width)
    if return_entropy:
        return logp, entropy.reshape(batch, width)
    return logp


def target_logprobs(hidden: torch.Tensor, lm_head: LMHead, targets: torch.Tensor, target_roles: torch.Tensor, *,
                    temperature: float = 1.0, chunk_size: int | None = None, include_world: bool = True,
                    return_entropy: bool = False):
    """Log-probs of the targets the ECHO loss reads; the head runs on those positions only.

    ACTION targets use ``temperature`` (the sampling temperature), OBSERVATION and WARNING targets T = 1, every
    other position gets 0 and no gradient. Same values and gradients as ``chunked_logprobs`` over all positions
    with ``temperature_mask=target_roles == Role.ACTION``, read on those positions.

    Args:
        hidden: [B, T, H] final hidden states at the positions that predict ``targets``.
        lm_head, chunk_size: as for :func:`chunked_logprobs`.
        targets: [B, T] target ids; target_roles: [B, T] their ``Role``.
        include_world: False scores the ACTION targets only (e.g. reference log-probs for the KL term).
        return_entropy: also return the entropy [B, T] (detached) of the tempered distribution on ACTION targets,
            0 elsewhere (what PaW's selection and the ``policy/entropy`` metric read).
    Returns:
        logprobs [B, T] float32, and entropy [B, T] float32 if asked.
    """
    logp = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)  # [B, T]
    entropy = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)  # [B, T]
    action = torch.nonzero(target_roles == Role.ACTION, as_tuple=True)  # ([N_a], [N_a])
    if action[0].numel():
        scored = chunked_logprobs(hidden[action][None], lm_head, targets[action][None], temperature=temperature,
                                  chunk_size=chunk_size, return_entropy=return_entropy)  # [1, N_a]
        if return_entropy:
            scored, action_entropy = scored
            entropy = entropy.index_put(action, action_entropy[0])
        logp = logp.index_put(action, scored[0])
    if include_world:
        world = torch.nonzero((target_roles == Role.OBSERVATION) | (target_roles == Role.WARNING), as_tuple=True)
        if world[0].numel():
            scored = chunked_logprobs(hidden[world][None], lm_head, targets[world][None],
                                      chunk_size=chunk_size)  # [1, N_w]
            logp = logp.index_put(world, scored[0])
    return (logp, entropy) if return_entropy else logp


def naive_logprobs(hidden: torch.Tensor, lm_head: LMHead, targets: torch.Tensor, *, temperature: float = 1.0,
                   temperature_mask: torch.Tensor | None = None, chunk_size: int | None = None,
                   return_entropy: bool = False):
    """Reference: full [B, T, V] float32 logits, ``log_softmax``, gather. Same signature (``chunk_size`` unused)."""
    weight, bias, module = _resolve_head(lm_head)
    logits = module(hidden) if module is not None else F.linear(hidden, weight, bias)  # [B, T, V]
    logits = logits.float()  # [B, T, V]
    if temperature != 1.0:
        logits = logits * _inverse_temperature(targets, temperature, temperature_mask)[..., None]
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, T, V]
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


def _module_vocab(module: nn.Module, hidden: torch.Tensor) -> int:
    """Output width of a generic head: ``out_features`` when it has one, else one probe row."""
    vocab = getattr(module, "out_features", None)
    if vocab is None:
        with torch.no_grad():
            vocab = module(hidden.reshape(-1, hidden.shape[-1])[:1]).shape[-1]
    return int(vocab)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would run in: the autocast dtype if autocast is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(hidden_chunk, weight, bias, inv_temp_chunk, tempered):
    """[n, V] float32 ``(hidden_chunk @ weight.T + bias) * inv_temp`` (the scaling pass only when tempered)."""
    logits = F.linear(hidden_chunk, weight, bias).float()  # [n, V]
    if tempered:
        logits.mul_(inv_temp_chunk[:, None])
    return logits


def _linear_forward(hidden, weight, bias, targets, inv_temp, chunk_size, return_entropy, want_hidden_grad):
    """Per-token log-probs [N], entropy [N] (or empty), log-normalisers [N] and, if asked, d logp / d hidden
    [N, H] float32."""
    num, _ = hidden.shape
    dtype = _compute_dtype(hidden, weight)
    weight_c = weight.to(dtype)  # [V, H]
    bias_c = bias.to(dtype) if bias is not None else None  # [V]
    tempered = bool((inv_temp != 1).any())
    valid = targets >= 0  # [N]
    safe_targets = targets.clamp_min(0)  # [N]
    logp = torch.empty(num, dtype=torch.float32, device=hidden.device)
    log_norm = torch.empty(num, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(num if return_entropy else 0, dtype=torch.float32, device=hidden.device)
    hidden_grad = torch.empty((num, weight.shape[1]) if want_hidden_grad else (0,), dtype=torch.float32,
                              device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, num, chunk_size):
            stop = min(start + chunk_size, num)
            target_chunk = safe_targets[start:stop, None]  # [n, 1]
            logits = _chunk_logits(hidden[start:stop].to(dtype), weight_c, bias_c, inv_temp[start:stop], tempered)
            # One [n, V] buffer, rewritten in place: z -> z - max -> exp(z - max). log_softmax would need a second.
            target_logit = logits.gather(1, target_chunk)  # [n, 1]
            row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            shifted = logits.sub_(row_max)  # [n, V] z - max
            if return_entropy:
                unnormalised = shifted.exp()  # [n, V] second buffer, only for the entropy
                sum_exp = unnormalised.sum(dim=-1, keepdim=True)  # [n, 1]
                # H = -sum p log p = log S - sum e (z - max) / S, with e = exp(z - max), S = sum e
                entropy[start:stop] = (sum_exp.log() - (unnormalised * shifted).sum(-1, keepdim=True) / sum_exp)[:, 0]
            else:
                unnormalised = shifted.exp_()  # [n, V]
                sum_exp = unnormalised.sum(dim=-1, keepdim=True)  # [n, 1]
            del logits, shifted  # the next chunk must not overlap this one's buffers
            log_norm[start:stop] = (row_max + sum_exp.log())[:, 0]  # logsumexp
            logp[start:stop] = target_logit[:, 0] - log_norm[start:stop]
            if want_hidden_grad:
                expected_row = (unnormalised.to(dtype) @ weight_c).float() / sum_exp  # [n, H] p^T W
                direction = weight_c[target_chunk[:, 0]].float() - expected_row  # [n, H] W[y] - p^T W
                scale = inv_temp[start:stop] * valid[start:stop]  # [n]
                hidden_grad[start:stop] = direction * scale[:, None]
            del unnormalised
    logp = torch.where(valid, logp, 0.0)
    return logp, entropy, log_norm, hidden_grad


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Chunked log-probs through a linear head; see the module docstring for the memory argument."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, chunk_size, return_entropy):
        want_hidden_grad = ctx.needs_input_grad[0]
        logp, entropy, log_norm, hidden_grad = _linear_forward(hidden, weight, bias, targets, inv_temp, chunk_size,
                                                               return_entropy, want_hidden_grad)
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(hidden_grad, *((hidden, weight, bias, targets, inv_temp, log_norm) if head_grad else ()))
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
            hidden, weight, bias, targets, inv_temp, log_norm = saved[1:]
            grad_weight, grad_bias = _head_backward(hidden, weight, bias if ctx.has_bias else None, targets,
                                                    inv_temp, log_norm, grad_logp, ctx.chunk_size)
            grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = grad_bias.to(bias.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _head_backward(hidden, weight, bias, targets, inv_temp, log_norm, grad_logp, chunk_size):
    """d/dW and d/db (float32), recomputing one chunk's softmax at a time.

    With ``c_n = g_n * s_n`` (upstream gradient times inverse temperature) the gradient of the raw logits is
    ``c_n (onehot(y_n) - p_n)``, so ``dW = sum_n onehot(y_n) (c_n h_n)^T - p^T (c h)``: the per-row factor goes on
    the [n, H] hidden rows and the [n, V] softmax is read once by a matmul.
    """
    dtype = _compute_dtype(hidden, weight)
    weight_c = weight.to(dtype)  # [V, H]
    bias_c = bias.to(dtype) if bias is not None else None
    tempered = bool((inv_temp != 1).any())
    valid = targets >= 0
    safe_targets = targets.clamp_min(0)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, H]
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)  # [V]
    coef_all = grad_logp * inv_temp * valid  # [N] c
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:stop].to(dtype)  # [n, H]
            probs = _chunk_logits(hidden_chunk, weight_c, bias_c, inv_temp[start:stop], tempered)
            probs = probs.sub_(log_norm[start:stop, None]).exp_()  # [n, V] softmax
            coef = coef_all[start:stop]  # [n]
            weighted_rows = hidden_chunk.float() * coef[:, None]  # [n, H] c h
            if dtype == torch.float32:
                grad_weight.addmm_(probs.T, weighted_rows, alpha=-1.0)  # in place: no [V, H] temporary
            else:
                grad_weight -= (probs.to(dtype).T @ weighted_rows.to(dtype)).float()
            rows = (safe_targets[start:stop],)
            grad_weight.index_put_(rows, weighted_rows, accumulate=True)  # index_add_ is far slower on CPU
            if bias is not None:
                grad_bias -= probs.T @ coef
                grad_bias.index_put_(rows, coef, accumulate=True)
            del probs
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
