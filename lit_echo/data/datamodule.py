"""``RolloutDataModule``: offline rollout buffers as a LightningDataModule configurable from YAML."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from torch.utils.data import DataLoader

from lit_echo.data.buffer import RolloutBuffer, check_rollout_paths
from lit_echo.data.collate import RolloutCollator, pad_token_id
from lit_echo.pretrained import load_tokenizer


class _EpochLoader(DataLoader):
    """Advances the buffer's epoch in the main process after each iterator is made (workers copy the dataset
    then), so each epoch reshuffles; a resume skip applies to the first iterator only."""

    def __iter__(self):
        iterator = super().__iter__()
        self.dataset.epoch += 1
        self.dataset.skip_batches = 0
        return iterator


def _require_stopping_point(trainer: Any) -> None:
    """The endless ``repeat`` stream never ends an epoch: fitting on it needs a step limit (``trainer.max_steps``),
    a batch limit per epoch (an integer ``limit_train_batches``), ``max_time`` or ``fast_dev_run``."""
    if trainer is None or trainer.max_steps != -1 or trainer.fast_dev_run:
        return
    if isinstance(trainer.limit_train_batches, int) or any(isinstance(cb, Timer) for cb in trainer.callbacks):
        return
    raise ValueError("data.repeat=true streams the training buffer forever, so an epoch never ends: set "
                     "trainer.max_steps (or set data.repeat=false to train by trainer.max_epochs)")


class RolloutDataModule(L.LightningDataModule):
    """Streams training rollouts from JSON-lines buffers; loads the (small) validation buffer into memory.

    Args:
        train_path: file, directory or glob of ``.jsonl`` / ``.jsonl.gz`` rollouts (or a list of them).
        val_path: held-out rollouts for ``val/world/nll_observation`` and ``val/world/acc_observation``; None
            disables validation.
        tokenizer: name or path of the tokenizer that renders messages records; normally linked to the model's
            ``model.model_name_or_path`` by the CLI.
        batch_size: rollouts per optimizer step of one rank (the module splits them into
            ``model.micro_batch_size`` rows per forward pass).
        val_batch_size: defaults to ``batch_size``.
        max_length: tokens per rollout after truncation (None: no limit).
        truncation: "right" keeps the first ``max_length`` tokens; "drop" leaves over-long rollouts out.
        shuffle: shuffle the training stream (a seeded streaming shuffle; groups stay together).
        shuffle_buffer: records held in memory by the streaming shuffle.
        seed: seed of the shuffle (with the epoch, the DDP rank and the dataloader worker).
        repeat: cycle the training buffer forever (train by ``trainer.max_steps``, required then); False: one pass
            per epoch.
        num_workers: dataloader workers; records are sharded across workers and DDP ranks.
        on_bad_record: "raise" (stop, naming file, line, field) or "skip" (log, count in ``data/skipped``).
            Either way a pass over the buffer that yields no usable rollout is an error.
        grpo_scale_by_std: advantages of records without one: GRPO (True) or Dr. GRPO (False).
        advantage: a constant advantage for every training record, replacing stored and GRPO ones. 1.0 trains
            expert rollouts as "SFT = RL with a constant positive advantage" (docs/method.md §3.6) through the
            same loss and module; None keeps the records' own.
    """

    def __init__(self, train_path: str | list[str] | None = None, val_path: str | list[str] | None = None,
                 tokenizer: str | None = None, batch_size: int = 8, val_batch_size: int | None = None,
                 max_length: int | None = 1024, truncation: Literal["right", "drop"] = "right",
                 shuffle: bool = True, shuffle_buffer: int = 1024, seed: int = 0, repeat: bool = True,
                 num_workers: int = 0, on_bad_record: Literal["raise", "skip"] = "raise",
                 grpo_scale_by_std: bool = True, advantage: float | None = None):
        super().__init__()
        # A missing input stops the run here, naming the option, before a model is loaded.
        check_rollout_paths("data.train_path", train_path)
        check_rollout_paths("data.val_path", val_path)
        self.save_hyperparameters()
        self._tokenizer: Any = None
        self.val_rollouts: list | None = None
        self.batches_trained = 0  # training batches delivered to training_step; saved in checkpoints

    # Resuming: the stream is deterministic given the seed, so skipping what was trained on continues it exactly.
    def state_dict(self) -> dict[str, Any]:
        return {"batches_trained": self.batches_trained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_trained = int(state_dict.get("batches_trained", 0))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process just before the step that trains on the batch (not at prefetch time).
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.batches_trained += 1
        return batch

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.hparams.tokenizer is not None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def collator(self, advantage: float | None = None) -> RolloutCollator:
        return RolloutCollator(pad_token_id(self.tokenizer), self.hparams.max_length, self.hparams.truncation,
                               advantage)

    def _buffer(self, path, **overrides) -> RolloutBuffer:
        h = self.hparams
        kwargs = {"tokenizer": self.tokenizer, "shuffle": h.shuffle, "shuffle_buffer": h.shuffle_buffer,
                  "seed": h.seed, "repeat": h.repeat, "on_bad_record": h.on_bad_record,
                  "grpo_scale_by_std": h.grpo_scale_by_std}
        kwargs.update(overrides)
        return RolloutBuffer(path, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.hparams.train_path is not None and self.hparams.repeat:
            _require_stopping_point(getattr(self, "trainer", None))
        if self.hparams.val_path is not None and self.val_rollouts is None:
            # Read every record in every process; Lightning's distributed sampler splits them across ranks.
            buffer = self._buffer(self.hparams.val_path, shuffle=False, repeat=False, shard=(0, 1))
            self.val_rollouts = [item.rollout for item in buffer]

    def train_dataloader(self) -> DataLoader:
        if self.hparams.train_path is None:
            raise ValueError("RolloutDataModule.train_path is not set: point it at a .jsonl/.jsonl.gz buffer")
        # Exact resume needs the endless stream (repeat=True, the default); a finite one restarts its epoch.
        skip = self.batches_trained if self.hparams.repeat else 0
        buffer = self._buffer(self.hparams.train_path, skip_batches=skip,
                              batch_size=self.hparams.batch_size)
        return _EpochLoader(buffer, batch_size=self.hparams.batch_size,
                            collate_fn=self.collator(self.hparams.advantage), num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rollouts:
            # No validation configured: Lightning's way to skip it is an empty list, about which it then warns
            # ("Total length of `list` across ranks is zero. Please make sure this was your intention") at every
            # validation point. It is the intention here.
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []
        return self._validation_loader(self.val_rollouts)

    def _validation_loader(self, dataset) -> DataLoader:
        """The loader of every validation (a held-out buffer here, environment episodes in the online module),
        in order, in-process. It has a generator of its own: starting a DataLoader iterator draws a seed from the
        global random stream otherwise, so each validation would move the training's stream (LoRA dropout,
        online sampling)."""
        return DataLoader(dataset, batch_size=self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False,
                          collate_fn=self.collator(), num_workers=0, generator=torch.Generator())
