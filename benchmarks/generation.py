"""Throughput of batched group generation vs generating the same rollouts one at a time.

Claim: :class:`lit_echo.online.GroupGenerator` sampling a group of G rollouts of one task in one batched
``generate`` per turn (left padding, KV cache) produces several times more sampled tokens per second than
running the same generator on the same tasks with G = 1, G times in a row.

Both arms run the identical code path (same environment, sampling settings, tasks, model and weights); only the
batch size differs. Sampling is random, so rollouts differ in length between arms: the figure compared is sampled
(ACTION) tokens per second of wall time, environment steps included. The arms alternate over ``--rounds`` rounds
(the machine may be shared; alternating spreads a slowdown over both) after one warm-up group.

    python benchmarks/generation.py                        # SmolLM2-135M-Instruct (LoRA), G = 8, a few minutes
    python benchmarks/generation.py --model tiny-random    # the tiny random model
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_echo import models
from lit_echo.envs.shellworld import ShellWorld
from lit_echo.online.generator import GenerationStats, GroupGenerator, SamplingSettings


def _run(generator: GroupGenerator, model, seed: int, group_size: int, batched: bool) -> GenerationStats:
    stats = GenerationStats()
    started = time.perf_counter()
    if batched:
        stats += generator.generate_group(model, seed, group_size)[1]
    else:
        for _ in range(group_size):
            stats += generator.generate_group(model, seed, 1)[1]
    stats.seconds = time.perf_counter() - started
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or checkpoint directory")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="tasks per arm (alternating)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 on a shared machine: busy cores make multi-threaded kernels stall)")
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long run on the tiny random model (keeps the script from rotting; tested)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.group_size, args.max_new_tokens, args.threads = "tiny-random", 2, 4, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = models.build_model(args.model, lora_rank=16, dtype=args.dtype)
    tokenizer = models.load_tokenizer(args.model)
    settings = SamplingSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                max_turns=args.max_turns)
    generator = GroupGenerator(lambda: ShellWorld("train"), tokenizer, settings)
    _run(generator, model, seed=10_000, group_size=2, batched=True)  # warm-up: kernels, allocator, caches

    totals = {True: GenerationStats(), False: GenerationStats()}
    for round_ in range(args.rounds):
        for batched in (True, False) if round_ % 2 == 0 else (False, True):
            totals[batched] += _run(generator, model, round_, args.group_size, batched)

    print(f"model {args.model} ({args.dtype}), G = {args.group_size}, {args.rounds} tasks per arm, "
          f"max_new_tokens {args.max_new_tokens}, max_turns {args.max_turns}, torch threads "
          f"{torch.get_num_threads()}")
    rates = {}
    for batched, name in ((True, f"batched (G={args.group_size} per generate)"), (False, "one at a time (G=1)")):
        s = totals[batched]
        rates[batched] = s.sampled_tokens / s.seconds
        print(f"  {name:32s} {s.rollouts:3d} rollouts  {s.sampled_tokens:6d} sampled tokens  {s.seconds:7.1f} s  "
              f"{rates[batched]:8.1f} tokens/s  {s.rollouts / s.seconds:6.2f} rollouts/s")
    print(f"speed-up (tokens/s, batched / one at a time): {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
