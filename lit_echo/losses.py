"""The ECHO / PaW objective: PPO-clip on ACTION tokens plus a world-model loss on OBSERVATION tokens.

Pure torch, no Lightning. Formulas follow docs/method.md §3 and §5 (ECHO, arXiv 2605.24517; PaW, arXiv
2606.02388). Position t of every ``[B, T]`` tensor describes the *target* token t (already shifted), and padding is
``Role.CONTEXT``.

``loss = policy_coef * policy + world_coef * world + kl_coef * kl``

Every setting lives in one frozen :class:`LossConfig` (defaults documented there); ``echo_loss`` takes it as
``config=`` and/or the same settings as keyword arguments (``echo_loss(..., world_coef=0.05)``).

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

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from lit_echo.distributed import collective_device
from lit_echo.roles import Role

POLICY_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
WORLD_NORMS = ("full_observation", "selected", "token_mean")
WORLD_TARGETS = ("env_only", "all")
WORLD_LOSSES = ("ce", "cmae")


@dataclass(frozen=True)
class PawConfig:
    """PaW's two additions to the world term (arXiv 2606.02388; the maths is in :mod:`lit_echo.paw`).

    select_fraction  None (default): off. Else alpha in (0, 1]: the world loss trains only on the top fraction of
                     transitions ranked by the mean entropy of their action tokens (PaW: 0.75).
    reward_adaptive  False (default). True: each sequence's world term is weighted by its group's
                     ``1 - mean_reward / max_reward`` (PaW; use ``world_coef=1``, PaW has no extra coefficient).
    max_reward       R_max of that weight (default 1.0, > 0).
    """

    select_fraction: float | None = None
    reward_adaptive: bool = False
    max_reward: float = 1.0

    def __post_init__(self) -> None:
        if self.select_fraction is not None and not 0.0 < self.select_fraction <= 1.0:
            raise ValueError(f"paw_select_fraction: expected None or a fraction in (0, 1], got {self.select_fraction}")
        if not self.max_reward > 0:
            raise ValueError(f"max_reward: expected R_max > 0, got {self.max_reward}")


@dataclass(frozen=True)
class LossConfig:
    """Every setting of :func:`echo_loss`; frozen, validated at construction (a ValueError names the setting).

    policy_coef     1.0    weight of the policy term; 0 is ECHO's verifier-free world-model-only mode. >= 0.
    world_coef      0.05   lambda of the world term (ECHO's value; 0 = the action-masking baseline). >= 0.
    world_target    "env_only"  OBSERVATION targets; "all" adds the WARNING tokens.
    world_norm      "full_observation"  per-sequence divisor |O_i| (ECHO, PaW); "selected": |O'_i|;
                    "token_mean": the step's selected world tokens.
    policy_agg      "token_mean"  | "seq_mean_token_mean" | "seq_mean_token_sum" | "seq_mean_token_sum_norm".
    clip_low        0.2    PPO-clip: ratio >= 1 - clip_low (in [0, 1)).
    clip_high       0.28   PPO-clip: ratio <= 1 + clip_high (>= 0; DAPO's "clip higher", the same default as
                    EchoModule).
    world_loss      "ce"   next-token NLL; "cmae": PaW's clipped MAE m * (1 - p), m = 1[p <= cmae_threshold].
    cmae_threshold  0.2    rho of the clipped MAE, in (0, 1].
    kl_coef         0.0    weight of the k3 KL to the reference log-probs on ACTION tokens (off at 0). >= 0.
    paw             PawConfig()  PaW's transition selection and reward-adaptive weights, applied by the caller
                    (they become ``world_select`` / ``world_weights``); ``echo_loss`` itself does not read them.
    """

    policy_coef: float = 1.0
    world_coef: float = 0.05
    world_target: str = "env_only"
    world_norm: str = "full_observation"
    policy_agg: str = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.28
    world_loss: str = "ce"
    cmae_threshold: float = 0.2
    kl_coef: float = 0.0
    paw: PawConfig = field(default_factory=PawConfig)

    def __post_init__(self) -> None:
        _check_choice("world_target", self.world_target, WORLD_TARGETS)
        _check_choice("world_norm", self.world_norm, WORLD_NORMS)
        _check_choice("policy_agg", self.policy_agg, POLICY_AGGS)
        _check_choice("world_loss", self.world_loss, WORLD_LOSSES)
        for name in ("policy_coef", "world_coef", "kl_coef", "clip_high"):
            value = getattr(self, name)
            if not value >= 0:  # also catches NaN
                raise ValueError(f"{name}: expected a number >= 0, got {value}")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low: expected a number in [0, 1), got {self.clip_low}")
        if not 0 < self.cmae_threshold <= 1:
            raise ValueError(f"cmae_threshold: expected a probability in (0, 1], got {self.cmae_threshold}")


_CONFIG_FIELDS = frozenset(f.name for f in fields(LossConfig))


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

    def all_reduce(self, group=None) -> LossNormalizers:
        """Sum the counts and take the max ``seq_len`` over data-parallel ranks (no-op without torch.distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        device = collective_device(group)
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
    """``loss`` to backpropagate; ``policy_loss``, ``world_loss``, ``kl`` before their coefficients; ``metrics``:
    detached 0-dim float32 tensors local to this micro-batch (combine micro-batches with :func:`merge_metrics`;
    convert to numbers once, at logging)."""

    loss: torch.Tensor  # []
    policy_loss: torch.Tensor  # []
    world_loss: torch.Tensor  # []
    kl: torch.Tensor  # []
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def echo_loss(logprobs: torch.Tensor, roles: torch.Tensor, advantages: torch.Tensor,
              old_logprobs: torch.Tensor | None = None, *, config: LossConfig | None = None,
              ref_logprobs: torch.Tensor | None = None, world_weights: torch.Tensor | None = None,
              world_select: torch.Tensor | None = None, normalizers: LossNormalizers | None = None,
              **settings) -> EchoLossOutput:
    """ECHO loss of one (micro-)batch; see the module docstring for the formulas and the normalizer contract.

    Args:
        logprobs: [B, T] log pi_theta of each target token from the current forward (gradient flows).
        roles: [B, T] ``Role`` of each target token; padding is CONTEXT.
        advantages: [B] sequence advantage (broadcast over T) or [B, T] per token.
        old_logprobs: [B, T] sampling log-probs, read on ACTION tokens only. None, or NaN at a position, means
            on-policy there (old = logp.detach(), ratio 1, gradient -adv * grad logp).
        config: a :class:`LossConfig` (default: ``LossConfig()``).
        **settings: :class:`LossConfig` fields overriding ``config`` (e.g. ``world_coef=0.05``).
        ref_logprobs: [B, T] reference log-probs for the k3 KL on ACTION tokens (used when ``kl_coef > 0``).
        world_weights: [B] per-sequence weight g_i of the world term (PaW's reward-adaptive lambda_g,
            ``lit_echo.paw.reward_adaptive_world_weights``; use world_coef=1 for PaW's "no extra coefficient").
        world_select: [B, T] bool, False removes a token from the world term only (transition selection,
            rollout filters); the policy term and the |O_i| of ``full_observation`` are untouched.
        normalizers: step-level counts from ``compute_normalizers`` (+ ``all_reduce``); None = this batch alone.
    Returns:
        :class:`EchoLossOutput`; its ``metrics`` are detached 0-dim tensors (no host sync inside the loss).
    """
    unknown = set(settings) - _CONFIG_FIELDS
    if unknown:
        raise TypeError(f"echo_loss: unknown setting(s) {sorted(unknown)}; LossConfig fields are "
                        f"{sorted(_CONFIG_FIELDS)}")
    cfg = config or LossConfig()
    if settings:
        cfg = replace(cfg, **settings)
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
    selected = world_target_mask(roles, cfg.world_target)  # [B, T] O'_i
    if world_select is not None:
        selected = selected & world_select.bool()

    if normalizers is None:
        normalizers = LossNormalizers(batch, int(action.sum()), int(selected.sum()), width)
    elif _checks_are_cheap(logprobs):
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
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)  # [B, T]
    per_token_policy = torch.maximum(-ratio * adv, -clipped_ratio * adv)  # [B, T] = -min(rho A, clip(rho) A)
    policy_weights = _policy_weights(action, cfg.policy_agg, normalizers, num_sequences, dtype)  # [B, T]
    policy = torch.where(action, policy_weights * per_token_policy, 0.0).sum()  # []

    # ---- KL to the reference (k3, ACTION tokens) ----
    use_kl = cfg.kl_coef > 0 and ref_logprobs is not None
    if use_kl:
        ref_minus_logp = torch.where(action, ref_logprobs.to(dtype) - logp, 0.0)  # [B, T]
        k3 = torch.exp(ref_minus_logp) - ref_minus_logp - 1.0  # [B, T]
        kl = torch.where(action, policy_weights * k3, 0.0).sum()  # []
    else:
        kl = logp.new_zeros(())

    # ---- world term (OBSERVATION tokens: no ratio, no clip, no KL) ----
    if cfg.world_coef != 0:
        world = _world_term(logp, selected, world_all, cfg, world_weights, normalizers, num_sequences)  # []
    else:
        world = logp.new_zeros(())

    total = cfg.policy_coef * policy + cfg.world_coef * world + (cfg.kl_coef * kl if use_kl else 0.0)

    with torch.no_grad():
        policy_scale = torch.where(action, policy_weights * (ratio * adv).abs(), 0.0).sum()  # []
        metrics = _metrics(logp_detached, ratio.detach(), log_ratio.detach(), adv, action, observation, warning,
                           selected, roles, cfg, policy, world, kl, total, policy_scale)
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


def _world_term(logp: torch.Tensor, selected: torch.Tensor, world_all: torch.Tensor, cfg: LossConfig,
                world_weights: torch.Tensor | None, normalizers: LossNormalizers, num_sequences: int) -> torch.Tensor:
    """The world term, a scalar: sum over selected tokens of weight_t * per-token world loss."""
    selected_f = selected.to(logp.dtype)  # [B, T]
    if cfg.world_norm == "full_observation":
        weights = selected_f / (num_sequences * world_all.to(logp.dtype).sum(dim=1, keepdim=True).clamp_min(1.0))
    elif cfg.world_norm == "selected":
        weights = selected_f / (num_sequences * selected_f.sum(dim=1, keepdim=True).clamp_min(1.0))
    else:  # token_mean
        weights = selected_f / max(normalizers.world_tokens, 1)
    if world_weights is not None:
        weights = weights * world_weights.to(logp.dtype).reshape(-1, 1)  # [B, T] * [B, 1]

    logp_sel = torch.where(selected, logp, 0.0)  # [B, T] padding may hold -inf/NaN
    if cfg.world_loss == "ce":
        per_token = -logp_sel  # [B, T] NLL
    else:  # cmae: m * (1 - p), m = 1[p <= rho]; its gradient is -m * p * grad logp
        prob = torch.exp(logp_sel)  # [B, T]
        keep = (prob <= cfg.cmae_threshold).detach() & selected  # [B, T]
        per_token = torch.where(keep, 1.0 - prob, 0.0)
    return torch.where(selected, weights * per_token, 0.0).sum()


# Metrics that are means, and the token count each one averages over: micro-batch metrics combine exactly by
# count-weighted sums (``merge_metrics``). Every other key of ``EchoLossOutput.metrics`` is a sum over tokens or
# sequences of the step, except ``world_policy_ratio`` (recombined through ``policy_scale``).
MEAN_METRICS = {
    "clipfrac_low": "tokens_action", "clipfrac_high": "tokens_action", "clipfrac": "tokens_action",
    "ratio_mean": "tokens_action", "approx_kl": "tokens_action", "nll_action": "tokens_action",
    "kl_mean": "tokens_action", "world_nll_observation": "tokens_observation", "world_nll_warning": "tokens_warning",
}


def _metrics(logp, ratio, log_ratio, adv, action, observation, warning, selected, roles, cfg, policy, world, kl,
             total, policy_scale) -> dict[str, torch.Tensor]:
    """Detached float32 0-dim tensors; means over an empty set are 0 (1 for ratio_mean): read the counts."""
    clip_low_hits = action & (ratio < 1.0 - cfg.clip_low) & (adv < 0)  # clip binding: no gradient
    clip_high_hits = action & (ratio > 1.0 + cfg.clip_high) & (adv > 0)
    world_value = world.detach().float()
    weighted_world = (cfg.world_coef * world_value).abs()
    return {
        "loss": total.detach().float(),
        "policy_loss": policy.detach().float(),
        "world_loss": world_value,
        "kl": kl.detach().float(),
        "clipfrac_low": _masked_mean(clip_low_hits, action),
        "clipfrac_high": _masked_mean(clip_high_hits, action),
        "clipfrac": _masked_mean(clip_low_hits | clip_high_hits, action),
        "ratio_mean": _masked_mean(ratio, action, empty=1.0),
        # cleanrl's approximate KL(old || new), ((r - 1) - log r), on the sampled ACTION tokens.
        "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, action),
        "nll_action": _masked_mean(-logp, action),
        "tokens_context": _count(roles == Role.CONTEXT),
        "tokens_action": _count(action),
        "tokens_observation": _count(observation),
        "tokens_warning": _count(warning),
        "tokens_world_selected": _count(selected),
        "world_nll_observation": _masked_mean(-logp, observation),
        "world_nll_warning": _masked_mean(-logp, warning),
        # The policy term's scale sum_t w_t |rho_t A_t| cannot cancel to ~0 the way the signed policy loss does;
        # with every advantage 0 it is 0, and the ratio is then defined as 0 (nothing to compare against).
        "policy_scale": policy_scale.float(),
        "world_policy_ratio": torch.where(policy_scale > 0, weighted_world / policy_scale.clamp_min(1e-30),
                                          0.0).float(),
    }


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().float()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, empty: float = 0.0) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (float32, 0-dim), ``empty`` when the mask is empty; no host sync."""
    count = mask.sum()
    total = torch.where(mask, values.to(torch.float64), 0.0).sum()
    return torch.where(count > 0, total / count.clamp_min(1), empty).float()


def metrics_to_sums(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Additive form of ``EchoLossOutput.metrics``: means times their counts, the ratio times ``policy_scale``.

    Sums of these over micro-batches (and ranks) give the step's exact metrics through :func:`sums_to_metrics`.
    """
    sums = dict(metrics)
    for name, count in MEAN_METRICS.items():
        if name in sums:
            sums[name] = sums[name] * sums[count]
    sums["world_policy_ratio"] = sums["world_policy_ratio"] * sums["policy_scale"]
    return sums


def sums_to_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`metrics_to_sums` (on summed values): means again, 0 where a count is 0."""
    metrics = dict(sums)
    for name, count in MEAN_METRICS.items():
        if name in metrics:
            empty = 1.0 if name == "ratio_mean" else 0.0
            metrics[name] = torch.where(sums[count] > 0, sums[name] / sums[count].clamp_min(1), empty)
    scale = sums["policy_scale"]
    metrics["world_policy_ratio"] = torch.where(scale > 0, sums["world_policy_ratio"] / scale.clamp_min(1e-30), 0.0)
    return metrics


def merge_metrics(metrics: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The step's metrics from its micro-batches' ``EchoLossOutput.metrics`` (exact, tensors, no host sync)."""
    as_sums = [metrics_to_sums(m) for m in metrics]
    return sums_to_metrics({name: sum(s[name] for s in as_sums) for name in as_sums[0]})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _checks_are_cheap(tensor: torch.Tensor) -> bool:
    """The normalizer check reads counts on the host: done on CPU, skipped on an accelerator (a sync per call)."""
    return tensor.device.type == "cpu"


def _check_normalizers(normalizers: LossNormalizers, batch: int, width: int, action: torch.Tensor,
                       selected: torch.Tensor) -> None:
    """Catch step counts that cannot cover this micro-batch (a wrong contract gives a silently wrong loss)."""
    if normalizers.num_sequences < batch or normalizers.seq_len < width:
        raise ValueError(f"normalizers {normalizers} cannot cover a micro-batch of shape [{batch}, {width}]: "
                         "compute them over every micro-batch of the step (compute_normalizers)")
    if normalizers.action_tokens < int(action.sum()) or normalizers.world_tokens < int(selected.sum()):
        raise ValueError(f"normalizers {normalizers} count fewer action/world tokens than this micro-batch has; "
                         "pass the same world_target and world_select to compute_normalizers")
