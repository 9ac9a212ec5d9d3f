"""The frozen linear weights of one model in two dtypes, swapped in place, for benchmarks that alternate arms.

Today's path kept a float32 base under bf16 autocast (every matmul cast its weight to bf16 at every forward);
``EchoModule(dtype="auto")`` now stores those weights in bf16 once under ``bf16-mixed``
(:func:`lit_echo.models.store_frozen_linears_in`: same numbers, no per-forward cast). A benchmark that alternates
the two paths step by step holds both copies and points each linear layer at the copy of the arm that runs next
(a tied head gets its own copy in the bf16 arm and the embedding back in the other; the LoRA matrices are shared).
"""

from __future__ import annotations

import torch
from torch import nn


class BaseWeights:
    """``use(arm)`` puts arm ``arm``'s copy of every frozen floating-point linear weight and bias in place.

    ``dtypes``: arm name -> dtype of its copy (``None``: the parameters the model holds now).
    """

    def __init__(self, model: nn.Module, dtypes: dict[str, torch.dtype | None]):
        self.slots = [(module, name) for module in model.modules() if isinstance(module, nn.Linear)
                      for name in ("weight", "bias")
                      if getattr(module, name, None) is not None and not getattr(module, name).requires_grad
                      and getattr(module, name).is_floating_point()]
        loaded = [getattr(module, name) for module, name in self.slots]
        self.copies = {arm: [p if dtype in (None, p.dtype) else nn.Parameter(p.detach().to(dtype), requires_grad=False)
                             for p in loaded]
                       for arm, dtype in dtypes.items()}

    def use(self, arm: str) -> None:
        for (module, name), param in zip(self.slots, self.copies[arm]):
            setattr(module, name, param)
