"""Batching rollouts: right padding, truncation, and the tensors the module trains on.

Truncation policy (``truncation``):
    "right" (default): keep the first ``max_length`` tokens and drop the tail. The task prompt and the first turns
        survive; tokens past the cut are not trained. Roles are per token, so a turn cut in the middle is still
        labelled exactly.
    "drop": leave over-long rollouts out of the batch (a batch that would be empty keeps the shortest rollout,
        truncated on the right).
Either way the batch reports how many rollouts were affected (``num_truncated``), and the module logs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lit_echo.data.buffer import BufferItem
from lit_echo.roles import Role
from lit_echo.rollout import Rollout

TRUNCATION_POLICIES = ("right", "drop")


class RolloutCollator:
    """Callable collate_fn turning rollouts (or :class:`BufferItem`s) into a batch dict.

    Batch keys (B rollouts, T = longest kept length):
        input_ids      [B, T] long, padded with ``pad_token_id``
        attention_mask [B, T] long, 1 on real tokens
        roles          [B, T] long, Role per token (padding is Role.CONTEXT)
        old_logprobs   [B, T] float32, sampling log-prob per token, NaN where unknown (the loss trains those
                       ACTION tokens on-policy)
        advantages     [B] float32 (0 where a record has none)
        rewards        [B] float32
        policy_version [B] long
        group_ids      list[str]
        num_truncated, num_skipped  ints for logging
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, truncation: str = "right",
                 advantage: float | None = None):
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one input and one target token), got {max_length}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.truncation = truncation
        self.advantage = advantage  # a constant for every rollout (SFT as RL), else the rollouts' own

    def __call__(self, items: Sequence[Rollout | BufferItem]) -> dict[str, Any]:
        rollouts = [it.rollout if isinstance(it, BufferItem) else it for it in items]
        skipped = sum(it.skipped for it in items if isinstance(it, BufferItem))
        limit = self.max_length or max(len(r) for r in rollouts)
        too_long = [len(r) > limit for r in rollouts]
        if self.truncation == "drop" and not all(too_long):
            rollouts = [r for r, long in zip(rollouts, too_long) if not long]
        elif self.truncation == "drop":
            rollouts = [min(rollouts, key=len)]
        B = len(rollouts)
        T = min(limit, max(len(r) for r in rollouts))
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((B, T), dtype=torch.long)  # [B, T]
        roles = torch.full((B, T), int(Role.CONTEXT), dtype=torch.long)  # [B, T]
        old_logprobs = torch.full((B, T), math.nan, dtype=torch.float32)  # [B, T]
        for i, r in enumerate(rollouts):
            n = min(len(r), T)
            input_ids[i, :n] = torch.tensor(r.input_ids[:n], dtype=torch.long)
            attention_mask[i, :n] = 1
            roles[i, :n] = torch.tensor(r.roles[:n], dtype=torch.long)
            if r.logprobs is not None:
                old_logprobs[i, :n] = torch.tensor([math.nan if lp is None else lp for lp in r.logprobs[:n]],
                                                   dtype=torch.float32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "roles": roles,
            "old_logprobs": old_logprobs,
            "advantages": torch.tensor([self.advantage if self.advantage is not None else (r.advantage or 0.0)
                                        for r in rollouts], dtype=torch.float32),  # [B]
            "rewards": torch.tensor([r.reward for r in rollouts], dtype=torch.float32),  # [B]
            "policy_version": torch.tensor([r.policy_version for r in rollouts], dtype=torch.long),  # [B]
            "group_ids": [r.group_id for r in rollouts],
            "num_truncated": sum(too_long),
            "num_skipped": skipped,
        }
