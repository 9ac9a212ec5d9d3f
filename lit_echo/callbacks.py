"""Callbacks shipped with lit_echo."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lit_echo.models import export_adapter, export_merged


class AdapterExport(L.Callback):
    """Write the LoRA adapter in peft's ``save_pretrained`` format, portable to plain transformers + peft.

    The directory holds ``adapter_config.json`` (its ``base_model_name_or_path`` is the module's
    ``model_name_or_path``, with built-in names mapped to their hub id, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``),
    ``adapter_model.safetensors`` and the base model's tokenizer.

    Args:
        dirpath: target directory; ``{step}`` in it is replaced by the global step. Relative paths are taken
            under ``trainer.default_root_dir``.
        every_n_steps: also export every N optimizer steps (None: only at the end of fit).
        merged_dirpath: also write the base model with the adapter merged into its weights here (a full
            checkpoint for ``AutoModelForCausalLM.from_pretrained``, tokenizer included); same ``{step}`` and
            relative-path rules. None (default): adapter only. Not available for a quantized base.
    """

    def __init__(self, dirpath: str = "adapter", every_n_steps: int | None = None,
                 merged_dirpath: str | None = None):
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.merged_dirpath = merged_dirpath
        self._tokenizer = None

    def _path(self, template: str, trainer: L.Trainer) -> Path:
        path = Path(template.format(step=trainer.global_step))
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    def _export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        base = getattr(module.hparams, "model_name_or_path", None)
        if self._tokenizer is None and base is not None:
            from lit_echo.pretrained import load_tokenizer

            self._tokenizer = load_tokenizer(base)
        export_adapter(module.model, self._path(self.dirpath, trainer), base_model_name_or_path=base,
                       tokenizer=self._tokenizer)
        if self.merged_dirpath is not None:
            export_merged(module.model, self._path(self.merged_dirpath, trainer), tokenizer=self._tokenizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)
