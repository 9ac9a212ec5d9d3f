"""Held-out evaluation of a policy: agent success in an environment and world-model quality on held-out rollouts.

    lit-echo evaluate --model smollm2-135m-instruct --adapter runs/shellworld-sft/adapter \\
        --env-kwargs '{"split": "heldout_trees"}' --seeds 0:8 --samples 8 \\
        --world-buffer data/shellworld/expert-heldout_trees.jsonl.gz --out eval.json

Agent metrics come from sampling ``--samples`` rollouts per task seed with the same generator as online training
(success rate, valid-action rate, mean turns); world-model metrics are the untempered NLL and top-1 accuracy on the
OBSERVATION tokens of a held-out buffer (``val/world_nll`` and ``val/world_acc`` of training).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_echo import models
from lit_echo.data.buffer import RolloutBuffer, check_rollout_paths
from lit_echo.data.collate import RolloutCollator, pad_token_id
from lit_echo.envs.base import import_env_class, import_object
from lit_echo.envs.shellworld.expert import seed_range
from lit_echo.metrics import world_model_sums
from lit_echo.online.generator import GroupGenerator, SamplingSettings
from lit_echo.precision import native_bf16


def load_policy(model: str, adapter: str | None, bf16: bool = False):
    """The base causal LM, with the LoRA adapter applied when given (eval mode). ``bf16``: its weights stored in
    bf16, for use under bf16 autocast (which computes the matmuls in bf16 anyway; casting float32 weights at
    every forward made decoding 2-3x slower on CPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(model))
    if adapter is not None:
        policy = PeftModel.from_pretrained(policy, adapter)
    if bf16:
        models.store_frozen_linears_in(policy, torch.bfloat16)
    return policy.eval()


def agent_metrics(policy, tokenizer, env_class: str, env_kwargs: dict, seeds: range, samples: int,
                  settings: SamplingSettings, on_group=None, tasks_per_batch: int = 1) -> dict[str, float]:
    """Success, valid-action rate and turns over ``samples`` rollouts of each task seed; ``on_group(seed,
    rollouts)``, when given, receives each task's rollouts (to keep them or count per task).
    ``tasks_per_batch`` tasks are sampled together (``tasks_per_batch * samples`` rows per forward)."""
    if tasks_per_batch < 1:
        raise ValueError(f"tasks_per_batch: expected >= 1, got {tasks_per_batch}")
    env_cls = import_env_class(env_class)
    generator = GroupGenerator(lambda: env_cls(**env_kwargs), tokenizer, settings)
    successes = turns = invalid = rollouts = 0
    seeds = list(seeds)
    try:
        for start in range(0, len(seeds), tasks_per_batch):
            batch = seeds[start:start + tasks_per_batch]
            groups, stats = generator.generate_groups(policy, batch, samples)
            rollouts += stats.rollouts
            successes += stats.successes
            turns += stats.turns
            invalid += stats.invalid_actions
            if on_group is not None:
                for seed, group in zip(batch, groups):
                    on_group(seed, group)
    finally:
        generator.close()
    return {"success_rate": successes / max(rollouts, 1), "valid_action_rate": 1 - invalid / max(turns, 1),
            "turns_mean": turns / max(rollouts, 1), "rollouts": rollouts}


@torch.no_grad()
def world_metrics(policy, tokenizer, buffer: str, batch_size: int = 8, max_length: int = 1024) -> dict[str, float]:
    collate = RolloutCollator(pad_token_id(tokenizer), max_length)
    # Sorted by length, so each batch pads to a similar length (the sums do not depend on the order).
    items = sorted(RolloutBuffer(buffer, tokenizer, shuffle=False), key=lambda item: len(item.rollout.input_ids))
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        device = policy.get_input_embeddings().weight.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = models.hidden_states(policy, ids, mask)  # [B, T, H]
        sums += world_model_sums(hidden, models.output_head(policy), ids, batch["roles"].to(device)).cpu()
    count = max(sums[2].item(), 1.0)
    return {"world_nll": sums[0].item() / count, "world_acc": sums[1].item() / count,
            "world_tokens": int(sums[2].item())}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the evaluation (``lit-echo evaluate ...`` or ``python -m lit_echo.evaluate ...``); returns the results."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (peft format)")
    parser.add_argument("--env-class", default="lit_echo.envs.shellworld.ShellWorld")
    parser.add_argument("--env-kwargs", default='{"split": "heldout_trees"}', type=json.loads)
    parser.add_argument("--seeds", default="0:8", type=seed_range, help="task seeds START:STOP")
    parser.add_argument("--samples", default=8, type=int, help="rollouts per task seed")
    parser.add_argument("--tasks-per-batch", default=4, type=int,
                        help="task seeds sampled together (tasks x samples rows per forward; more is faster "
                             "while memory allows)")
    parser.add_argument("--temperature", default=0.8, type=float)
    parser.add_argument("--top-p", default=1.0, type=float)
    parser.add_argument("--max-new-tokens", default=64, type=int)
    parser.add_argument("--max-turns", default=6, type=int)
    parser.add_argument("--world-buffer", default=None, help="held-out rollouts for world NLL / accuracy")
    parser.add_argument("--torch-seed", default=0, type=int)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 where the hardware computes it natively (CPUs with avx512_bf16/AMX, "
                             "most GPUs), else fp32 (bf16 is several times slower than fp32 on AVX2-only CPUs)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    # Mistakes stop here, naming the option, before the model loads.
    if args.adapter is not None:
        models.check_adapter_dir(args.adapter, option="--adapter")
    check_rollout_paths("--world-buffer", args.world_buffer)
    import_object(args.env_class, "--env-class")

    torch.manual_seed(args.torch_seed)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "bf16" if native_bf16(device) else "fp32"
    tokenizer = models.load_tokenizer(args.model)
    policy = load_policy(args.model, args.adapter, bf16=args.precision == "bf16")
    settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                max_turns=args.max_turns, max_total_tokens=2048)
    result = {"model": args.model, "adapter": args.adapter, "env_kwargs": args.env_kwargs,
              "seeds": f"{args.seeds.start}:{args.seeds.stop}", "samples": args.samples,
              "temperature": args.temperature, "precision": args.precision}
    policy.to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        result.update(agent_metrics(policy, tokenizer, args.env_class, args.env_kwargs, args.seeds, args.samples,
                                    settings, tasks_per_batch=args.tasks_per_batch))
        if args.world_buffer:
            result.update(world_metrics(policy, tokenizer, args.world_buffer))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from lit_echo.user_errors import report_user_errors

    with report_user_errors("python -m lit_echo.evaluate"):
        main()
