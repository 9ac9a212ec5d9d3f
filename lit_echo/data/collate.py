"""Batching rollouts: right padding, truncation, and the tensors the module trains on.

Truncation policy (``truncation``):
    "right" (default): keep the first ``max_length`` tokens and drop the tail. The task prompt and the first turns
        survive; tokens past the cut are not trained. Roles are per token, so a turn cut in the middle is still
        labelled exactly.
    "drop": leave over-long rollouts out of the batch (a batch that would be empty keeps the shortest rollout,
        truncated on the right).
Either way the batch reports how many rollouts were affected (``num_truncated``), and the module logs it. A
``max_length`` that leaves no rollout of a batch any ACTION/OBSERVATION/WARNING token (every prompt is longer) is
an error at the first batch and a warning later.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from lit_echo.advantages import group_mean_rewards
from lit_echo.data.buffer import BufferItem
from lit_echo.roles import Role
from lit_echo.rollout import Rollout

log = logging.getLogger(__name__)


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token, else 0 (also
    without a tokenizer). Padding is masked out of attention and loss, so the id only has to exist."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _prompt_length(rollout: Rollout) -> int | None:
    """Tokens before the first learnable target (the first non-CONTEXT token after position 0), None if the
    rollout has none; ``max_length`` must exceed it for the rollout to train anything."""
    return next((t for t in range(1, len(rollout.roles)) if rollout.roles[t] != Role.CONTEXT), None)

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
        group_reward_mean [B] float32, mean reward of each row's whole group: from the buffer (computed over the
                       whole group before shuffling), else over the rows of that group in this batch (online
                       batches hold whole groups); a row without a group id is its own group
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
        self._batches = 0
        self._last_warning = -math.inf

    def __call__(self, items: Sequence[Rollout | BufferItem]) -> dict[str, Any]:
        rollouts = [it.rollout if isinstance(it, BufferItem) else it for it in items]
        skipped = sum(it.skipped for it in items if isinstance(it, BufferItem))
        group_means = self._group_means(items, rollouts)
        limit = self.max_length or max(len(r) for r in rollouts)
        self._check_length(rollouts, limit)
        too_long = [len(r) > limit for r in rollouts]
        if self.truncation == "drop" and not all(too_long):
            keep = [not long for long in too_long]
        elif self.truncation == "drop":
            shortest = min(range(len(rollouts)), key=lambda i: len(rollouts[i]))
            keep = [i == shortest for i in range(len(rollouts))]
        else:
            keep = [True] * len(rollouts)
        rollouts = [r for r, k in zip(rollouts, keep) if k]
        group_means = [m for m, k in zip(group_means, keep) if k]
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
            "group_reward_mean": torch.tensor(group_means, dtype=torch.float32),  # [B]
            "policy_version": torch.tensor([r.policy_version for r in rollouts], dtype=torch.long),  # [B]
            "group_ids": [r.group_id for r in rollouts],
            "num_truncated": sum(too_long),
            "num_skipped": skipped,
        }

    @staticmethod
    def _group_means(items: Sequence[Rollout | BufferItem], rollouts: list[Rollout]) -> list[float]:
        """[B] whole-group mean rewards: the buffer's, else the mean over the batch rows of the group."""
        known = [it.group_reward_mean if isinstance(it, BufferItem) else None for it in items]
        if all(m is not None for m in known):
            return known
        # Rows without a group id are groups of their own (as in the buffer): give them unique keys.
        groups = [r.group_id if r.group_id else ("", i) for i, r in enumerate(rollouts)]
        in_batch = group_mean_rewards([r.reward for r in rollouts], groups)
        return [m if m is not None else b for m, b in zip(known, in_batch)]

    def _check_length(self, rollouts: list[Rollout], limit: int) -> None:
        """Error (first batch) or warning (later, at most once a minute) when ``max_length`` cuts every rollout of
        the batch before its first learnable token: such a batch trains nothing and logs a loss of 0."""
        self._batches += 1
        if self.max_length is None:
            return
        prompts = [p for p in map(_prompt_length, rollouts) if p is not None]
        if not prompts or min(prompts) < limit:
            return
        message = (f"data.max_length={self.max_length} cuts every rollout of this batch before its first "
                   f"ACTION/OBSERVATION/WARNING token (the shortest prompt here is {min(prompts)} tokens), so it "
                   f"trains nothing; raise data.max_length above {min(prompts)}")
        if self._batches == 1:
            raise ValueError(message + " (checked on the first batch)")
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning(message)
