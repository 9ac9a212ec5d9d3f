"""Is an online run that was killed and resumed bit-identical to one that was not, on this machine and model?

Trains one online run of the comparison grid's recipe (:func:`lit_echo.experiments.grid.online_config`, action
masking, round-2 sizes) twice from the same start: once straight through, once killed with SIGKILL as soon as
its checkpoint after step ``--kill-after`` is whole, then continued by the grid's own :func:`fit` (which resumes
from the newest loadable checkpoint). Prints whether the final adapters and the trained rollouts are identical.

    python scripts/check_exact_resume.py --steps 3 --kill-after 1            # SmolLM2, ~20 min on 2 AVX2 cores
    python scripts/check_exact_resume.py --model tiny-random --steps 6 --kill-after 2   # seconds

Precision is what the grid would use here (bf16 autocast where the CPU has it natively, else float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from lit_echo.experiments.compare import fit
from lit_echo.experiments.grid import CHECKPOINTS, ROUND2, arms, online_config


def _trained(root: Path) -> list[dict]:
    records = [json.loads(line) for line in (root / "rollouts" / "rollouts-rank0.jsonl").read_text().splitlines()]
    for record in records:
        record["metadata"].pop("run_id")  # one id per run
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kill-after", type=int, default=1, help="kill once this step's checkpoint is written")
    parser.add_argument("--init-adapter", default=None, help="start from this adapter (default: the bare model)")
    parser.add_argument("--out", default="runs/exact-resume")
    args = parser.parse_args()
    if not 0 < args.kill_after < args.steps:
        raise SystemExit("--kill-after must be between 0 and --steps")
    precision = ROUND2.precision if args.model != "tiny-random" else "32-true"
    spec = dataclasses.replace(ROUND2, model=args.model, precision=precision, online_steps=args.steps,
                               eval_every=args.kill_after)  # a checkpoint every --kill-after steps
    mask = next(a for a in arms(spec.online_steps, spec.arm_set) if a.name == "mask")
    out = Path(args.out).resolve()

    def config(root: Path) -> dict:
        cfg = online_config(spec, mask, 0, root, Path(args.init_adapter or "unused"))
        if args.init_adapter is None:
            del cfg["model"]["init_adapter"]
        return cfg

    whole, killed = out / "whole", out / "killed"
    print(f"precision {precision}; straight through: {whole}", flush=True)
    seconds = fit(config(whole), whole)
    print(f"  {seconds:.0f} s", flush=True)

    shutil.rmtree(killed, ignore_errors=True)
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text(yaml.safe_dump(config(killed), sort_keys=False))
    checkpoint = killed / CHECKPOINTS / f"step={args.kill_after}.ckpt"
    with open(killed / "fit.log", "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "lit_echo.cli", "fit", "--config",
                                    str(killed / "config.yaml")], stdout=log_file, stderr=subprocess.STDOUT)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the run ended before its step-{args.kill_after} checkpoint (see {killed}/fit.log)")
        try:
            torch.load(checkpoint, weights_only=False)
            break
        except (FileNotFoundError, RuntimeError, EOFError):
            time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    print(f"killed after the step-{args.kill_after} checkpoint; continuing: {killed}", flush=True)
    seconds = fit(config(killed), killed)
    print(f"  {seconds:.0f} s", flush=True)

    name = f"adapters/step-{args.steps}/adapter_model.safetensors"
    a, b = load_file(whole / name), load_file(killed / name)
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_data = _trained(whole) == _trained(killed)
    print(f"final adapter bit-identical: {same_weights}; trained rollouts identical: {same_data}")
    raise SystemExit(0 if same_weights and same_data else 1)


if __name__ == "__main__":
    main()
