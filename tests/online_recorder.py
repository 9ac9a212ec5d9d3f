"""A callback for the kill -9 test (tests/test_online_crash.py): appends, durably, the token ids of every batch
handed to training_step, with its step. Not a test module; imported by the CLI subprocess."""

from __future__ import annotations

import json
import os

import lightning as L


class TrainedRows(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "rows": rows}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
