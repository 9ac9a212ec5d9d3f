"""Where torch.distributed collectives run (pure torch, no Lightning): shared by the loss normalizers and PaW's
step-wide selection, the two places the module talks to other data-parallel ranks itself."""

from __future__ import annotations

import torch


def collective_device(group=None) -> torch.device:
    """The device a collective's tensors must be on: the current CUDA device under NCCL, the CPU otherwise (gloo)."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
