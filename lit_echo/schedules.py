"""World-term weights: world_coef schedules (ECHO) and PaW's per-group weights and transition selection.

Pure torch. ECHO (arXiv 2605.24517) uses a constant ``world_coef`` of 0.05; its reference code also offers linear
and step decay. PaW (arXiv 2606.02388) weights each group by ``1 - mean_return_g / R_max`` and trains the world
model only on the top ``fraction`` (0.75) of transitions ranked by the mean entropy of their action tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lit_echo.roles import Role

SCHEDULE_KINDS = ("constant", "linear", "step")


def constant_coef(step: int, *, world_coef: float) -> float:
    """``world_coef`` at every step."""
    return float(world_coef)


def linear_decay_coef(step: int, *, world_coef: float, final_coef: float, decay_steps: int) -> float:
    """``world_coef + (final_coef - world_coef) * min(step / decay_steps, 1)``: linear, then flat at final_coef."""
    progress = min(max(step, 0) / max(decay_steps, 1), 1.0)
    return float(world_coef + (final_coef - world_coef) * progress)


def step_decay_coef(step: int, *, world_coef: float, gamma: float, step_size: int, final_coef: float = 0.0) -> float:
    """``max(world_coef * gamma ** (step // step_size), final_coef)``: multiply by gamma every step_size steps."""
    return float(max(world_coef * gamma ** (max(step, 0) // max(step_size, 1)), final_coef))


@dataclass
class WorldCoefSchedule:
    """world_coef as a function of the optimizer step; a plain dataclass so a YAML config can build it.

    kind         "constant" | "linear" | "step".
    world_coef   the coefficient at step 0 (ECHO: 0.05; 0.01-0.05 productive, 0.2 collapses).
    final_coef   "linear": value reached at ``decay_steps``; "step": floor of the decay.
    decay_steps  "linear": steps to go from world_coef to final_coef.
    gamma        "step": factor applied every ``step_size`` steps.
    step_size    "step": steps between decays.

    Example (YAML): ``world_coef_schedule: {kind: linear, world_coef: 0.05, final_coef: 0.0, decay_steps: 500}``.
    """

    kind: str = "constant"
    world_coef: float = 0.05
    final_coef: float = 0.0
    decay_steps: int = 1000
    gamma: float = 0.5
    step_size: int = 100

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"WorldCoefSchedule.kind: expected one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        if self.decay_steps < 1 or self.step_size < 1:
            raise ValueError(f"WorldCoefSchedule: decay_steps and step_size must be >= 1, got {self.decay_steps} "
                             f"and {self.step_size}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return constant_coef(step, world_coef=self.world_coef)
        if self.kind == "linear":
            return linear_decay_coef(step, world_coef=self.world_coef, final_coef=self.final_coef,
                                     decay_steps=self.decay_steps)
        return step_decay_coef(step, world_coef=self.world_coef, gamma=self.gamma, step_size=self.step_size,
                               final_coef=self.final_coef)


def reward_adaptive_world_weights(rewards: torch.Tensor, group_ids: torch.Tensor, max_reward: float) -> torch.Tensor:
    """PaW's per-group world weight ``lambda_g = 1 - mean_return_g / R_max``, returned per sequence.

    Args:
        rewards: [B] return of each rollout (expected in [0, R_max]; not clamped).
        group_ids: [B] integer group of each rollout (rollouts of the same task).
        max_reward: R_max > 0.
    Returns:
        [B] float32 weight of each sequence's group: failing groups (mean return 0) get 1, solved groups get 0.
        Pass it as ``echo_loss(world_weights=...)`` with ``world_coef=1`` (PaW uses no extra coefficient).
    """
    if max_reward <= 0:
        raise ValueError(f"max_reward: expected R_max > 0, got {max_reward}")
    rewards = rewards.float().reshape(-1)  # [B]
    _, group_index = torch.unique(group_ids.reshape(-1), return_inverse=True)  # [B] in 0..G-1
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    group_sum = torch.zeros(num_groups, device=rewards.device).index_add_(0, group_index, rewards)  # [G]
    group_size = torch.zeros(num_groups, device=rewards.device).index_add_(0, group_index, torch.ones_like(rewards))
    group_mean = group_sum / group_size  # [G]
    return 1.0 - group_mean[group_index] / max_reward  # [B]


def transition_ids_from_roles(roles: torch.Tensor) -> torch.Tensor:
    """[B, T] long: index of the transition (one action span and the tokens up to the next one) of each token.

    A new transition starts at each ACTION token that follows a non-ACTION token, so an observation belongs to the
    action that caused it. Tokens before the first action get -1 (no transition).
    """
    action = roles == Role.ACTION  # [B, T]
    previous = torch.zeros_like(action)
    previous[:, 1:] = action[:, :-1]
    starts = action & ~previous  # [B, T]
    return starts.long().cumsum(dim=1) - 1


def select_transitions_by_entropy(entropy: torch.Tensor, roles: torch.Tensor,
                                  transition_ids: torch.Tensor | None = None, *, fraction: float = 0.75) -> torch.Tensor:
    """PaW data selection: world mask of the top ``fraction`` of transitions by mean action-token entropy.

    A transition is the pair (sequence i, ``transition_ids[i, t]``); with ``transition_ids=None`` each sequence is one
    transition. Candidates are transitions with at least one OBSERVATION or WARNING token. Each is scored by the mean
    of ``entropy`` over its ACTION tokens (-inf when it has none, so it ranks last), and the
    ``ceil(fraction * num_candidates)`` highest-scoring ones over the whole batch are kept (ties: earlier first).

    Args:
        entropy: [B, T] full-vocabulary entropy of each target position (nats; e.g. from
            ``chunked_logprobs(..., return_entropy=True)``); read on ACTION tokens only.
        roles: [B, T] Role of each target token.
        transition_ids: [B, T] integer transition of each token (negative: none), e.g.
            ``transition_ids_from_roles(roles)``; or None.
        fraction: alpha, the share of transitions kept (PaW: 0.75).
    Returns:
        [B, T] bool, True on the OBSERVATION/WARNING tokens of kept transitions: ``echo_loss(world_select=...)``.
        Select over the whole optimizer step (concatenate micro-batches first) to match PaW.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected alpha in [0, 1], got {fraction}")
    batch, width = roles.shape
    if transition_ids is None:
        transition_ids = torch.zeros_like(roles, dtype=torch.long)
    transition_ids = transition_ids.long()  # [B, T]
    world_all = (roles == Role.OBSERVATION) | (roles == Role.WARNING)  # [B, T]
    action = roles == Role.ACTION  # [B, T]
    valid = transition_ids >= 0  # [B, T]

    # One key per (sequence, transition); unique() makes them dense 0..K-1.
    stride = int(transition_ids.max().clamp_min(0)) + 1 if transition_ids.numel() else 1
    rows = torch.arange(batch, device=roles.device)[:, None].expand(batch, width)  # [B, T]
    keys = torch.where(valid, rows * stride + transition_ids, -1)  # [B, T]
    unique_keys, key_index = torch.unique(keys, return_inverse=True)  # [K], [B, T]
    num_keys = unique_keys.numel()
    flat_index = key_index.reshape(-1)  # [B*T]

    def per_key_sum(values: torch.Tensor) -> torch.Tensor:  # [B, T] -> [K]
        return torch.zeros(num_keys, device=roles.device).index_add_(0, flat_index, values.reshape(-1).float())

    action_in = action & valid
    entropy_sum = per_key_sum(torch.where(action_in, entropy.float(), 0.0))  # [K]
    action_count = per_key_sum(action_in)  # [K]
    world_count = per_key_sum(world_all & valid)  # [K]
    score = torch.where(action_count > 0, entropy_sum / action_count.clamp_min(1.0),
                        torch.full_like(entropy_sum, -math.inf))  # [K]
    candidate = (world_count > 0) & (unique_keys >= 0)  # [K]

    candidate_ids = torch.nonzero(candidate).reshape(-1)  # [C] in key order = (sequence, transition) order
    num_keep = math.ceil(fraction * candidate_ids.numel() - 1e-9)
    order = torch.sort(score[candidate_ids], descending=True, stable=True).indices  # [C]
    kept = torch.zeros(num_keys, dtype=torch.bool, device=roles.device)
    kept[candidate_ids[order[:num_keep]]] = True
    return kept[key_index] & world_all & valid  # [B, T]
