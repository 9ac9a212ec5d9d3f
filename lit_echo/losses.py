"""The ECHO / PaW objective: PPO-clip on ACTION tokens plus a world-model loss on OBSERVATION tokens.

Pure torch, no Lightning. Formulas follow docs/method.md §3 and §5 (ECHO, arXiv 2605.24517; PaW, arXiv
2606.02388). Position t of every ``[B, T]`` tensor describes the *target* token t (already shifted), and padding is
``Role.CONTEXT``.

``loss = policy_coef * policy + world_coef * world + kl_coef * kl``

Policy term, on ACTION tokens A_i of sequence i (``rho_t = exp(logp_t - old_t)``):
    ``l_t = -min(rho_t * adv, clip(rho_t, 1 - clip_low, 1 + clip_high) * adv)``, aggregated by ``policy_agg``:
    - ``token_mean``:              sum_{i, t in A_i} l_t / max(sum_i |A_i|, 1)
    - ``seq_mean_token_mean``:     (1/B) sum_i sum_{t in A_i} l_t / max(|A_i|, 1)
    - ``seq_mean_token_sum``:      (1/B) sum_i sum_{t in A_i} l_t
    - ``seq_mean_token_sum_norm``: sum_{i, t in A_i} l_t / (B * T)   (T: padded length, a constant per step)

World term, per token ``w_t = -logp_t`` (``world_loss="ce"``) or ``w_t = m_t * (1 - p_t)``, ``m_t = 1[p_t <= rho]``
(``world_loss="cmae"``, PaW's clipped MAE), on the selected observation tokens O'_i (OBSERVATION for
``world_target="env_only"``, OBSERVATION and WARNING for ``"all"``, intersected with ``world_select``), with O_i all
OBSERVATION and WARNING tokens of sequence i and ``g_i`` the per-sequence ``world_weights`` (default 1):
    - ``full_observation``: (1/B) sum_i g_i sum_{t in O'_i} w_t / max(|O_i|, 1)      (ECHO's and PaW's setting)
    - ``selected``:         (1/B) sum_i g_i sum_{t in O'_i} w_t / max(|O'_i|, 1)
    - ``token_mean``:       sum_i g_i sum_{t in O'_i} w_t / max(sum_i |O'_i|, 1)

KL term (``kl_coef > 0`` and ``ref_logprobs`` given): k3 = ``exp(ref - logp) - (ref - logp) - 1`` on ACTION tokens,
aggregated like the policy term.

B counts every sequence, including those without action or observation tokens; an empty count divides by 1.

Normalizer contract (gradient accumulation and data parallelism)
-----------------------------------------------------------------
Every denominator above is either per sequence (|A_i|, |O_i|, |O'_i|: read from the micro-batch itself) or global
to the optimizer step (B, sum |A_i|, sum |O'_i|, T). The global ones come in through ``normalizers``:

1. Before the first backward of a step, each rank calls
   ``compute_normalizers([mb_roles for every micro-batch of the step], world_target=..., world_select=[...],
   max_length=...)`` and then ``normalizers.all_reduce()`` (sum of the counts, max of ``seq_len`` over ranks).
   Only roles (and selection masks) are needed, so this is cheap; the step's micro-batches must be known up front
   (e.g. the module receives the whole step and splits it, or the data module attaches the step's counts).
2. Each micro-batch calls ``echo_loss(..., normalizers=normalizers)``. Its ``.loss`` is that micro-batch's share:
   the SUM of ``.loss`` over all micro-batches and all ranks equals ``echo_loss`` on the concatenated global batch.
3. Gradients must therefore be summed, not averaged. DDP/FSDP average gradients over ranks (divide by
   ``world_size``), so backpropagate ``loss * world_size``. Lightning's automatic optimization also divides the
   returned loss by ``accumulate_grad_batches``: return ``loss * world_size * accumulate_grad_batches`` there, or,
   with manual optimization, call ``manual_backward(loss * world_size)`` per micro-batch.
4. The step's objective for logging is the all-reduced sum over micro-batches of ``.loss.detach()``.

``seq_len`` (T of ``seq_mean_token_sum_norm``) must be one constant for the whole step: the longest padded length
over the step's micro-batches and ranks (the default of ``compute_normalizers``) or a configured ``max_length``
(the Dr. GRPO choice; then the value also stays fixed across steps). Without ``normalizers`` every count comes from
the batch given, which is right for a step that is one batch on one device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from lit_echo.roles import Role

POLICY_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
WORLD_NORMS = ("full_observation", "selected", "token_mean")
WORLD_TARGETS = ("env_only", "all")
WORLD_LOSSES = ("ce", "cmae")
WORLD_MODES = ("ce", "advantage")


@dataclass(frozen=True)
class LossNormalizers:
    """Counts over the whole optimizer step (all micro-batches, all ranks) that the loss divides by.

    num_sequences  B: every sequence of the step, empty ones included.
    action_tokens  sum_i |A_i|: ACTION targets (``policy_agg="token_mean"`` and the KL term).
    world_tokens   sum_i |O'_i|: selected world-loss targets (``world_norm="token_mean"``).
    seq_len        T of ``seq_mean_token_sum_norm``: the longest padded length of the step, or ``max_length``.
    """

    num_sequences: int
    action_tokens: int
    world_tokens: int
    seq_len: int

    def all_reduce(self, group=None) -> "LossNormalizers":
        """Sum the counts and take the max ``seq_len`` over data-parallel ranks (no-op without torch.distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        backend = torch.distributed.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        counts = torch.tensor([self.num_sequences, self.action_tokens, self.world_tokens], dtype=torch.float64,
                              device=device)  # [3]
        seq_len = torch.tensor([self.seq_len], dtype=torch.float64, device=device)  # [1]
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
        torch.distributed.all_reduce(seq_len, op=torch.distributed.ReduceOp.MAX, group=group)
        b, a, w = (int(round(x)) for x in counts.tolist())
        return replace(self, num_sequences=b, action_tokens=a, world_tokens=w, seq_len=int(seq_len.item()))


def world_target_mask(roles: torch.Tensor, world_target: str = "env_only") -> torch.Tensor:
    """[B, T] bool: targets the world term may train on (before ``world_select``)."""
    _check_choice("world_target", world_target, WORLD_TARGETS)
    if world_target == "env_only":
        return roles == Role.OBSERVATION
    return (roles == Role.OBSERVATION) | (roles == Role.WARNING)


def compute_normalizers(roles: torch.Tensor | Sequence[torch.Tensor], *, world_target: str = "env_only",
                        world_select: torch.Tensor | Sequence[torch.Tensor] | None = None,
                        max_length: int | None = None) -> LossNormalizers:
    """Step-level counts from the roles of every micro-batch of one optimizer step on this rank.

    ``roles``: one ``[B, T]`` tensor or a list of ``[B_m, T_m]`` micro-batches (widths may differ);
    ``world_select``: the matching ``[B, T]`` bool transition-selection mask(s), or None; ``max_length``: fixed T for
    ``seq_mean_token_sum_norm`` (default: the widest micro-batch). Call ``.all_reduce()`` on the result under DDP.
    """
    roles_list = [roles] if isinstance(roles, torch.Tensor) else list(roles)
    if world_select is None:
        select_list = [None] * len(roles_list)
    else:
        select_list = [world_select] if isinstance(world_select, torch.Tensor) else list(world_select)
        if len(select_list) != len(roles_list):
            raise ValueError(f"world_select: expected one mask per micro-batch ({len(roles_list)}), "
                             f"got {len(select_list)}")
    num_sequences = action_tokens = world_tokens = seq_len = 0
    for mb_roles, mb_select in zip(roles_list, select_list):
        if mb_roles.dim() != 2:
            raise ValueError(f"roles: expected [B, T] per micro-batch, got shape {tuple(mb_roles.shape)}")
        selected = world_target_mask(mb_roles, world_target)  # [B, T]
        if mb_select is not None:
            selected = selected & mb_select.bool()
        num_sequences += mb_roles.shape[0]
        action_tokens += int((mb_roles == Role.ACTION).sum())
        world_tokens += int(selected.sum())
        seq_len = max(seq_len, mb_roles.shape[1])
    if max_length is not None:
        if max_length < seq_len:
            raise ValueError(f"max_length={max_length} is shorter than a micro-batch of width {seq_len}")
        seq_len = max_length
    return LossNormalizers(num_sequences, action_tokens, world_tokens, seq_len)


@dataclass
class EchoLossOutput:
    """``loss`` to backpropagate; ``policy_loss``, ``world_loss``, ``kl`` before their coefficients; floats in
    ``metrics`` (local to this micro-batch; token counts are included so a caller can re-weight them)."""

    loss: torch.Tensor  # []
    policy_loss: torch.Tensor  # []
    world_loss: torch.Tensor  # []
    kl: torch.Tensor  # []
    metrics: dict[str, float] = field(default_factory=dict)


def echo_loss(logprobs: torch.Tensor, roles: torch.Tensor, advantages: torch.Tensor,
              old_logprobs: torch.Tensor | None = None, *, policy_coef: float = 1.0, world_coef: float = 0.05,
              world_target: str = "env_only", world_norm: str = "full_observation",
              policy_agg: str = "token_mean", clip_low: float = 0.2, clip_high: float = 0.2,
              world_loss: str = "ce", world_mode: str = "ce", cmae_threshold: float = 0.2,
              kl_coef: float = 0.0, ref_logprobs: torch.Tensor | None = None,
              world_weights: torch.Tensor | None = None, world_select: torch.Tensor | None = None,
              normalizers: LossNormalizers | None = None) -> EchoLossOutput:
    """ECHO loss of one (micro-)batch; see the module docstring for the formulas and the normalizer contract.

    Args:
        logprobs: [B, T] log pi_theta of each target token from the current forward (gradient flows).
        roles: [B, T] ``Role`` of each target token; padding is CONTEXT.
        advantages: [B] sequence advantage (broadcast over T) or [B, T] per token.
        old_logprobs: [B, T] sampling log-probs, read on ACTION tokens only. None, or NaN at a position, means
            on-policy there (old = logp.detach(), ratio 1, gradient -adv * grad logp).
        policy_coef: weight of the policy term; 0 gives ECHO's verifier-free world-model-only mode.
        world_coef: lambda of the world term; 0 is the action-masking baseline (the world term is then not built).
        world_target: "env_only" (OBSERVATION) or "all" (OBSERVATION and WARNING).
        world_norm: "full_observation" | "selected" | "token_mean".
        policy_agg: "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum" | "seq_mean_token_sum_norm".
        clip_low, clip_high: PPO-clip epsilons (ratio clipped to [1 - clip_low, 1 + clip_high]).
        world_loss: "ce" (next-token NLL) or "cmae" (PaW clipped MAE m * (1 - p), m = 1[p <= cmae_threshold]).
        world_mode: "ce" computes the world term directly; "advantage" writes it as RL with a constant positive
            advantage inside the surrogate (ratio exp(logp - logp.detach()) = 1, no clip, per-token weights of
            ``world_norm``). Same value and same gradient as "ce".
        cmae_threshold: rho of the clipped MAE.
        kl_coef, ref_logprobs: k3 KL to reference log-probs [B, T] on ACTION tokens (off unless both are set).
        world_weights: [B] per-sequence weight g_i of the world term (PaW's reward-adaptive lambda_g,
            ``lit_echo.schedules.reward_adaptive_world_weights``; use world_coef=1 for PaW's "no extra coefficient").
        world_select: [B, T] bool, False removes a token from the world term only (transition selection,
            rollout filters); the policy term and the |O_i| of ``full_observation`` are untouched.
        normalizers: step-level counts from ``compute_normalizers`` (+ ``all_reduce``); None = this batch alone.
    """
    _check_choice("policy_agg", policy_agg, POLICY_AGGS)
    _check_choice("world_norm", world_norm, WORLD_NORMS)
    _check_choice("world_loss", world_loss, WORLD_LOSSES)
    _check_choice("world_mode", world_mode, WORLD_MODES)
    if logprobs.dim() != 2 or roles.shape != logprobs.shape:
        raise ValueError(f"logprobs and roles: expected equal [B, T] shapes, got {tuple(logprobs.shape)} and "
                         f"{tuple(roles.shape)}")
    batch, width = logprobs.shape
    dtype = torch.promote_types(logprobs.dtype, torch.float32)  # bf16 -> float32, float64 stays
    logp = logprobs.to(dtype)  # [B, T]
    action = roles == Role.ACTION  # [B, T]
    observation = roles == Role.OBSERVATION  # [B, T]
    warning = roles == Role.WARNING  # [B, T]
    world_all = observation | warning  # [B, T] O_i
    selected = world_target_mask(roles, world_target)  # [B, T] O'_i
    if world_select is not None:
        selected = selected & world_select.bool()

    if normalizers is None:
        normalizers = LossNormalizers(batch, int(action.sum()), int(selected.sum()), width)
    _check_normalizers(normalizers, batch, width, action, selected)
    num_sequences = max(normalizers.num_sequences, 1)

    # ---- policy term (PPO-clip on ACTION tokens) ----
    adv = advantages.to(dtype)
    adv = adv[:, None].expand(batch, width) if adv.dim() == 1 else adv  # [B, T]
    adv = torch.where(action, adv, 0.0)  # [B, T] non-action entries may be NaN/garbage
    logp_detached = logp.detach()
    if old_logprobs is None:
        old = logp_detached  # [B, T]
    else:
        old = old_logprobs.to(dtype)
        old = torch.where(action & ~torch.isnan(old), old, logp_detached)  # [B, T] NaN -> on-policy there
    log_ratio = torch.where(action, logp - old, 0.0)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    per_token_policy = torch.maximum(-ratio * adv, -clipped_ratio * adv)  # [B, T] = -min(rho A, clip(rho) A)
    policy_weights = _policy_weights(action, policy_agg, normalizers, num_sequences, dtype)  # [B, T]
    policy = torch.where(action, policy_weights * per_token_policy, 0.0).sum()  # []

    # ---- KL to the reference (k3, ACTION tokens) ----
    use_kl = kl_coef > 0 and ref_logprobs is not None
    if use_kl:
        ref_minus_logp = torch.where(action, ref_logprobs.to(dtype) - logp, 0.0)  # [B, T]
        k3 = torch.exp(ref_minus_logp) - ref_minus_logp - 1.0  # [B, T]
        kl = torch.where(action, policy_weights * k3, 0.0).sum()  # []
    else:
        kl = logp.new_zeros(())

    # ---- world term (OBSERVATION tokens: no ratio, no clip, no KL) ----
    if world_coef != 0:
        world = _world_term(logp, selected, world_all, world_norm, world_loss, world_mode, cmae_threshold,
                            world_weights, normalizers, num_sequences)  # []
    else:
        world = logp.new_zeros(())

    total = policy_coef * policy + world_coef * world + (kl_coef * kl if use_kl else 0.0)

    metrics = _metrics(logp_detached, ratio.detach(), adv, action, observation, warning, selected, roles,
                       clip_low, clip_high, policy, world, kl, total, world_coef)
    if use_kl:
        metrics["kl_mean"] = _masked_mean(k3.detach(), action)
    return EchoLossOutput(loss=total, policy_loss=policy, world_loss=world, kl=kl, metrics=metrics)


def _policy_weights(action: torch.Tensor, policy_agg: str, normalizers: LossNormalizers, num_sequences: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """[B, T] per-token weights so that the policy term is sum(weight * l) over ACTION tokens."""
    action_f = action.to(dtype)  # [B, T]
    if policy_agg == "token_mean":
        return action_f / max(normalizers.action_tokens, 1)
    if policy_agg == "seq_mean_token_mean":
        per_sequence = action_f.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, 1] max(|A_i|, 1)
        return action_f / (num_sequences * per_sequence)
    if policy_agg == "seq_mean_token_sum":
        return action_f / num_sequences
    return action_f / (num_sequences * normalizers.seq_len)  # seq_mean_token_sum_norm


def _world_term(logp: torch.Tensor, selected: torch.Tensor, world_all: torch.Tensor, world_norm: str,
                world_loss: str, world_mode: str, cmae_threshold: float, world_weights: torch.Tensor | None,
                normalizers: LossNormalizers, num_sequences: int) -> torch.Tensor:
    """The world term, a scalar: sum over selected tokens of weight_t * per-token world loss."""
    selected_f = selected.to(logp.dtype)  # [B, T]
    if world_norm == "full_observation":
        weights = selected_f / (num_sequences * world_all.to(logp.dtype).sum(dim=1, keepdim=True).clamp_min(1.0))
    elif world_norm == "selected":
        weights = selected_f / (num_sequences * selected_f.sum(dim=1, keepdim=True).clamp_min(1.0))
    else:  # token_mean
        weights = selected_f / max(normalizers.world_tokens, 1)
    if world_weights is not None:
        weights = weights * world_weights.to(logp.dtype).reshape(-1, 1)  # [B, T] * [B, 1]

    logp_sel = torch.where(selected, logp, 0.0)  # [B, T] padding may hold -inf/NaN
    if world_loss == "ce":
        per_token = -logp_sel  # [B, T] NLL
        advantage = torch.ones_like(logp_sel)  # [B, T] d(per_token) = -1 * grad logp
    else:  # cmae: m * (1 - p), m = 1[p <= rho]; its gradient is -m * p * grad logp
        prob = torch.exp(logp_sel)  # [B, T]
        keep = (prob <= cmae_threshold).detach() & selected  # [B, T]
        per_token = torch.where(keep, 1.0 - prob, 0.0)
        advantage = torch.where(keep, prob, 0.0).detach()

    if world_mode == "advantage":
        # RL with a constant positive advantage: -advantage * ratio, ratio = exp(logp - logp.detach()) == 1, no
        # clip. The detached constant (advantage + per_token) only makes the value read as the world loss.
        ratio = torch.exp(logp_sel - logp_sel.detach())  # [B, T]
        per_token = -advantage * ratio + (advantage + per_token).detach()
    return torch.where(selected, weights * per_token, 0.0).sum()


def _metrics(logp, ratio, adv, action, observation, warning, selected, roles, clip_low, clip_high, policy,
             world, kl, total, world_coef) -> dict[str, float]:
    clip_low_hits = action & (ratio < 1.0 - clip_low) & (adv < 0)  # clip binding: no gradient
    clip_high_hits = action & (ratio > 1.0 + clip_high) & (adv > 0)
    n_action = int(action.sum())
    clipfrac_low = int(clip_low_hits.sum()) / max(n_action, 1)
    clipfrac_high = int(clip_high_hits.sum()) / max(n_action, 1)
    policy_value = float(policy.detach())
    world_value = float(world.detach())
    return {
        "loss": float(total.detach()),
        "policy_loss": policy_value,
        "world_loss": world_value,
        "kl": float(kl.detach()),
        "clipfrac_low": clipfrac_low,
        "clipfrac_high": clipfrac_high,
        "clipfrac": clipfrac_low + clipfrac_high,
        "ratio_mean": _masked_mean(ratio, action, empty=1.0),
        "tokens_context": int((roles == Role.CONTEXT).sum()),
        "tokens_action": n_action,
        "tokens_observation": int(observation.sum()),
        "tokens_warning": int(warning.sum()),
        "tokens_world_selected": int(selected.sum()),
        "world_nll_observation": _masked_mean(-logp, observation),
        "world_nll_warning": _masked_mean(-logp, warning),
        "world_policy_ratio": abs(world_coef * world_value) / max(abs(policy_value), 1e-8),
    }


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, empty: float = 0.0) -> float:
    count = int(mask.sum())
    if count == 0:
        return empty
    return float(torch.where(mask, values, 0.0).sum()) / count


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _check_normalizers(normalizers: LossNormalizers, batch: int, width: int, action: torch.Tensor,
                       selected: torch.Tensor) -> None:
    """Catch step counts that cannot cover this micro-batch (a wrong contract gives a silently wrong loss)."""
    if normalizers.num_sequences < batch or normalizers.seq_len < width:
        raise ValueError(f"normalizers {normalizers} cannot cover a micro-batch of shape [{batch}, {width}]: "
                         "compute them over every micro-batch of the step (compute_normalizers)")
    if normalizers.action_tokens < int(action.sum()) or normalizers.world_tokens < int(selected.sum()):
        raise ValueError(f"normalizers {normalizers} count fewer action/world tokens than this micro-batch has; "
                         "pass the same world_target and world_select to compute_normalizers")
