"""The online data module under DDP: two CPU ranks (gloo) in a subprocess, as Lightning launches them.

Each rank plays its own tasks and writes its own buffer; a run resumed from a mid-run checkpoint on as many ranks
ends with the same weights, batches and buffers, to the bit, as the run that went on (every rank's prefetched groups
and random states are gathered into the checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lit_echo.data.buffer import RolloutBuffer

pytestmark = pytest.mark.slow  # two 2-rank fits of a tiny model: about a minute on 2 cores

SCRIPT = textwrap.dedent("""
    import sys
    import lightning as L, torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    sys.path.insert(0, sys.argv[5])
    from online_recorder import TrainedRows
    from lit_echo import EchoModule
    from lit_echo.online import OnlineRolloutDataModule

    class Rows(TrainedRows):  # one file per rank and run
        def setup(self, trainer, pl_module, stage):
            self.path = f"{self.path}-rank{trainer.global_rank}.jsonl"

    ckpt, root, tag, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None
    torch.manual_seed(0)
    module = EchoModule(model_name_or_path=ckpt, lora_rank=4, world_coef=0.5, lr=1e-3, temperature=0.9)
    data = OnlineRolloutDataModule(env_class="lit_echo.envs.shellworld.ShellWorld", env_kwargs={"split": "train"},
                                   group_size=2, groups_per_step=1, generate_every=2, max_new_tokens=8, max_turns=2,
                                   max_total_tokens=768, buffer_dir=f"{root}/rollouts", tokenizer=ckpt,
                                   max_length=768)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Rows(f"{root}/rows-{tag}"),
                                   ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=1, save_top_k=-1)])
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.is_global_zero:
        torch.save({n: p.detach() for n, p in module.named_parameters() if p.requires_grad}, f"{root}/{tag}.pt")
""")


def _fit(tiny_checkpoint, root: Path, tag: str, resume: str = "") -> None:
    script = root / "online_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MASTER_PORT": str(32000 + os.getpid() % 1000)}
    subprocess.run([sys.executable, str(script), str(tiny_checkpoint), str(root), tag, resume,
                    str(Path(__file__).parent)], check=True, timeout=600, env=env, cwd=root)


def _buffer(root: Path, rank: int):
    return [item.rollout for item in RolloutBuffer(root / "rollouts" / f"rollouts-rank{rank}.jsonl", shuffle=False)]


def _rows(root: Path, tag: str, rank: int) -> list[dict]:
    return [json.loads(line) for line in (root / f"rows-{tag}-rank{rank}.jsonl").read_text().splitlines()]


def test_two_ranks_play_their_own_tasks_and_resume_bit_identical(tiny_checkpoint, tmp_path):
    _fit(tiny_checkpoint, tmp_path, "whole")
    weights, buffers = torch.load(tmp_path / "whole.pt"), [_buffer(tmp_path, r) for r in (0, 1)]
    # Group n of rank r plays task env_seed + 2n + r: four groups each, no task twice.
    seeds = [[int(re.search(r"seed(\d+)$", r.group_id).group(1)) for r in buffer[::2]] for buffer in buffers]
    for rank, buffer in enumerate(buffers):
        assert [r.metadata["group_index"] for r in buffer] == [0, 0, 1, 1, 2, 2, 3, 3]
        assert seeds[rank] == [seeds[0][0] + 2 * n + rank for n in range(4)]
    assert [r.input_ids for r in buffers[0]] != [r.input_ids for r in buffers[1]]

    # The checkpoint after step 1 (inside a round of generate_every=2) holds each rank's prefetched group 1.
    resume_from = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    state = torch.load(resume_from, weights_only=False)["OnlineRolloutDataModule"]
    assert [[r["metadata"]["group_index"] for g in p["groups"] for r in g] for p in state["prefetched_by_rank"]] == [
        [1, 1], [1, 1]]

    _fit(tiny_checkpoint, tmp_path, "resumed", resume=str(resume_from))
    resumed = torch.load(tmp_path / "resumed.pt")
    assert resumed.keys() == weights.keys() and len(weights) > 0
    assert all(torch.equal(resumed[name], weights[name]) for name in weights)
    for rank in (0, 1):
        assert _rows(tmp_path, "resumed", rank) == _rows(tmp_path, "whole", rank)[1:]
        assert _buffer(tmp_path, rank) == buffers[rank]  # each trained group once, as the whole run left it
