"""Callbacks shipped with lit_echo."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lit_echo.models import export_adapter


class AdapterExport(L.Callback):
    """Write the LoRA adapter in peft's ``save_pretrained`` format (loadable with ``PeftModel.from_pretrained``).

    Args:
        dirpath: target directory; ``{step}`` in it is replaced by the global step. Relative paths are taken
            under ``trainer.default_root_dir``.
        every_n_steps: also export every N optimizer steps (None: only at the end of fit).
    """

    def __init__(self, dirpath: str = "adapter", every_n_steps: int | None = None):
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps

    def _export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(self.dirpath.format(step=trainer.global_step))
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        export_adapter(module.model, path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)
