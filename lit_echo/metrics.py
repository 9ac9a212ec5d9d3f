"""World-model evaluation metrics (docs/method.md §7): NLL and top-1 accuracy on observation tokens.

Pure torch; the head runs chunk by chunk so the full ``[B, T, V]`` logits never exist at once.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_echo.roles import Role


@torch.no_grad()
def masked_nll_and_accuracy(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, mask: torch.Tensor,
                            chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over the masked positions of the untempered next-token NLL and of top-1 correctness.

    Args:
        hidden: [B, T, H] final hidden states at the positions that predict ``targets``.
        lm_head: maps [N, H] -> [N, V].
        targets: [B, T] target ids.
        mask: [B, T] bool, positions to score (e.g. OBSERVATION targets).
    Returns:
        (nll_sum, correct_sum, count) as float64 scalars, so callers can sum over batches and ranks before dividing.
    """
    flat_hidden = hidden[mask]  # [N, H]
    flat_targets = targets[mask]  # [N]
    nll = torch.zeros((), dtype=torch.float64, device=hidden.device)
    correct = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, flat_targets.numel(), chunk_size):
        logits = lm_head(flat_hidden[start:start + chunk_size]).float()  # [n, V]
        target = flat_targets[start:start + chunk_size]  # [n]
        logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)  # [n]
        nll -= logp.double().sum()
        correct += (logits.argmax(dim=-1) == target).double().sum()
    count = torch.tensor(float(flat_targets.numel()), dtype=torch.float64, device=hidden.device)
    return nll, correct, count


def world_model_sums(hidden: torch.Tensor, lm_head: nn.Module, input_ids: torch.Tensor, roles: torch.Tensor,
                     chunk_size: int = 256) -> torch.Tensor:
    """[3] float64 (nll_sum, correct_sum, count) over the OBSERVATION targets of a batch.

    Args:
        hidden: [B, T, H] final hidden states of the whole sequence (position t predicts token t+1).
        input_ids, roles: [B, T] tokens and their roles, unshifted.
    """
    targets = input_ids[:, 1:]  # [B, T-1]
    mask = roles[:, 1:] == Role.OBSERVATION  # [B, T-1], the role of the token each position predicts
    return torch.stack(masked_nll_and_accuracy(hidden[:, :-1], lm_head, targets, mask, chunk_size))
