"""PaW's additions to the world term (arXiv 2606.02388): reward-adaptive group weights and transition selection.

Pure torch. PaW weights each group's world term by ``1 - mean_return_g / R_max`` (failing groups learn the world
model most) and trains the world model only on the top ``fraction`` (0.75) of transitions ranked by the mean entropy
of their action tokens. Both produce inputs of :func:`lit_echo.losses.echo_loss`: ``world_weights`` [B] and
``world_select`` [B, T].
"""

from __future__ import annotations

import math

import torch

from lit_echo.distributed import collective_device
from lit_echo.roles import Role


def group_world_weights(group_reward_mean: torch.Tensor, max_reward: float) -> torch.Tensor:
    """PaW's ``lambda_g = 1 - mean_return_g / R_max`` from each row's whole-group mean reward.

    Args:
        group_reward_mean: [B] mean reward of each rollout's whole group (the batch key ``group_reward_mean``,
            computed by the data path over the full group, not over the rows that happen to share a batch).
        max_reward: R_max > 0.
    Returns:
        [B] float32 weight per sequence: failing groups (mean return 0) get 1, solved groups get 0.
    """
    if max_reward <= 0:
        raise ValueError(f"max_reward: expected R_max > 0, got {max_reward}")
    return 1.0 - group_reward_mean.float().reshape(-1) / max_reward  # [B]


def reward_adaptive_world_weights(rewards: torch.Tensor, group_ids: torch.Tensor, max_reward: float) -> torch.Tensor:
    """PaW's per-group world weight ``lambda_g = 1 - mean_return_g / R_max``, group means over the rows given.

    Right when the rows hold whole groups (an online batch); for shuffled offline rows use
    :func:`group_world_weights` with the data path's whole-group means.

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
                                  transition_ids: torch.Tensor | None = None, *,
                                  fraction: float = 0.75, across_ranks: bool = False) -> torch.Tensor:
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
        across_ranks: under torch.distributed, rank the transitions of every rank together (all-gathers of
            the candidates' scores; rank order, then row order, breaks ties), so data-parallel ranks keep the
            same transitions one process would keep from their rows together. False: this rank's rows only.
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
    keep = top_fraction(score[candidate_ids], fraction, across_ranks=across_ranks)  # [C]
    kept = torch.zeros(num_keys, dtype=torch.bool, device=roles.device)
    kept[candidate_ids[keep]] = True
    return kept[key_index] & world_all & valid  # [B, T]


def top_fraction(scores: torch.Tensor, fraction: float, *, across_ranks: bool = False) -> torch.Tensor:
    """[C] bool: True on the ``ceil(fraction * N)`` highest of ``scores`` [C] (ties: earlier first).

    N = C, or with ``across_ranks`` under an initialized torch.distributed group of several ranks, the number of
    scores over all ranks: every rank's scores are gathered in rank order, ranked together, and each rank gets
    back the part of the answer that covers its own scores.
    """
    all_scores, start = _gather_in_rank_order(scores) if across_ranks else (scores, 0)  # [N]
    num_keep = math.ceil(fraction * all_scores.numel() - 1e-9)
    order = torch.sort(all_scores, descending=True, stable=True).indices  # [N]
    keep = torch.zeros(all_scores.numel(), dtype=torch.bool, device=scores.device)  # [N]
    keep[order[:num_keep]] = True
    return keep[start:start + scores.numel()]  # [C]


def _gather_in_rank_order(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's 1-D float ``values`` concatenated in rank order, and where this rank's values start.

    Two collectives (sizes, then padded values); without an initialized group of several ranks, (values, 0).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, 0
    home = values.device
    device = collective_device()
    values = values.float().to(device)  # [C]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([values.numel()], dtype=torch.long, device=device))
    counts = [int(n.item()) for n in sizes]
    if max(counts) == 0:
        return values.to(home), 0
    padded = torch.zeros(max(counts), device=device)  # [max C]
    padded[:values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    everything = torch.cat([g[:n] for g, n in zip(gathered, counts)])  # [N]
    start = sum(counts[:dist.get_rank()])
    return everything.to(home), start
