"""One demo-like online ECHO step, timed by phase: today's path vs the new one, in the same run.

* today's path: one HF ``generate`` per turn (every turn prefills every row's whole conversation); a float32 base
  under bf16 autocast (each matmul casts its weight at every forward).
* new path: the KV cache kept across the group and the turns (shared opening prefilled once, each turn prefills
  only its new tokens), grouped-query decode attention on CPU (``lit_echo.online.attention``), and, where bf16
  is native, the frozen base stored in bf16 (``EchoModule(dtype="auto")`` under ``bf16-mixed``).

A step = generate one group of G rollouts of a ShellWorld task (SmolLM2-135M-Instruct + LoRA r=16, up to 4 turns
of at most 48 new tokens, temperature 0.8: configs/demo.yaml's sampling) + one ``EchoModule.training_step`` on
them through a real Lightning Trainer. The two generation paths alternate step by step (ABBA...), so load swings
on a shared machine hit both; each step plays a new task, and both arms see the same tasks. Precision: bf16
autocast where the CPU computes bf16 natively, else float32 (``lit_echo.precision``), unless ``--dtype``.

Printed per arm: seconds per step in prefill, decode (one-token forwards plus sampling), environment and training;
prefill positions per sampled token; achieved FLOP/s of the step (linear-layer matmuls only: 2 N FLOPs per token
forward, 4 N for LoRA training's forward + input-gradient backward) as a fraction of a peak matmul FLOP/s
measured in the same run. Then the ratios (today / KV cache).

    python benchmarks/online_step.py            # SmolLM2-135M-Instruct, G=8, 4 turns, 48 tokens; ~10 minutes
    python benchmarks/online_step.py --tiny     # tiny random model, seconds

``--backend hf,vllm`` compares the two generation backends instead (needs vLLM: ``pip install -e ".[vllm]"``):
``hf`` is the KV-cache path above, ``vllm`` a vLLM engine (:mod:`lit_echo.online.vllm_engine`) handed the
current LoRA adapter before each of its steps (training changes it in between, so every vLLM step pays a sync)
and rescored by the trainer's model. Printed per arm as well: engine start-up (once), sync, rescore seconds per
step and the engine/trainer log-prob mismatch; ``--vllm-sync weights`` measures merged-weight loading instead of
a new LoRA adapter per version.

    python benchmarks/online_step.py --backend hf,vllm --threads 1
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from base_weights import BaseWeights  # noqa: E402  (benchmarks/, the script's own folder)
from torch.utils.data import DataLoader, IterableDataset

from lit_echo import models
from lit_echo.advantages import grpo_advantages
from lit_echo.data.collate import RolloutCollator
from lit_echo.envs.shellworld import ShellWorld
from lit_echo.online.generator import GenerationStats, GroupGenerator, SamplingSettings
from lit_echo.precision import native_bf16

ARMS = ("generate", "kv_cache")
BACKEND_ARMS = ("hf", "vllm")


@dataclass
class Arm:
    stats: GenerationStats = field(default_factory=GenerationStats)
    train_s: list[float] = field(default_factory=list)
    train_tokens: int = 0
    steps: int = 0


def peak_matmul_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of a ``size``-cubed matmul in ``dtype`` (the machine's attainable matmul rate)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def linear_parameters(model) -> tuple[int, int]:
    """``(decoder linear parameters, output head parameters)``: the matmul weights a token passes through."""
    body = models.decoder(model)
    layers = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))
    return layers, models.output_head(model).weight.numel()


class _Steps(IterableDataset):
    """``steps`` batches, each one freshly generated group; the arm alternates ABBA... (finite, so Lightning's
    look-ahead fetch does not generate a batch nobody trains on)."""

    def __init__(self, bench: Bench, steps: int):
        self.bench, self.steps = bench, steps

    def __iter__(self):
        for step in range(self.steps):
            yield self.bench.generate(step)


class Bench:
    def __init__(self, args, module, tokenizer, autocast, weights: BaseWeights, arms: tuple[str, str] = ARMS,
                 sampler=None):
        self.args, self.module, self.autocast, self.weights = args, module, autocast, weights
        self.names = arms
        self.arms = {name: Arm() for name in arms}
        self.collate = RolloutCollator(tokenizer.pad_token_id, max_length=args.max_total_tokens)

        def settings(name: str) -> SamplingSettings:
            return SamplingSettings(
                temperature=args.temperature, max_new_tokens=args.max_new_tokens, max_turns=args.max_turns,
                max_total_tokens=args.max_total_tokens, max_observation_chars=1500, kv_cache=name != "generate",
                backend="vllm" if name == "vllm" else "hf")

        self.generators = {name: GroupGenerator(lambda: ShellWorld("train"), tokenizer, settings(name),
                                                sampler=sampler if name == "vllm" else None)
                           for name in arms}
        # Warm-up (kernels, allocator, both paths once): a short generation, not counted.
        self.warmup = GroupGenerator(lambda: ShellWorld("train"), tokenizer, SamplingSettings(
            temperature=args.temperature, max_new_tokens=8, max_turns=1, max_total_tokens=args.max_total_tokens))
        self.pending: dict[int, GenerationStats] = {}  # generated, not yet trained (Lightning fetches ahead)

    def arm_of(self, step: int) -> str:
        if step < 2:  # warm-up steps, one per arm, not counted
            return self.names[step]
        k = step - 2
        return self.names[(k + k // 2) % 2]  # ABBA ABBA ...

    def generate(self, step: int):
        arm = self.arm_of(step)
        seed = 100_000 + (step - 2) // 2 if step >= 2 else 90_000  # both arms of a pair play the same task
        torch.manual_seed(step)
        # The warm-up step of the vLLM arm runs its own generator: it starts the engine (start-up is reported).
        generator = self.generators[arm] if step >= 2 or arm == "vllm" else self.warmup
        generator.settings.kv_cache = arm != "generate"
        self.weights.use(arm)
        with self.autocast():
            # policy_version = step: every vLLM step is handed the adapter training has changed since its last
            rollouts, stats = generator.generate_group(self.module.model, seed, self.args.group_size,
                                                       policy_version=step)
        for rollout, advantage in zip(rollouts, grpo_advantages([r.reward for r in rollouts],
                                                                [r.group_id for r in rollouts])):
            rollout.advantage = advantage
        self.pending[step] = stats
        batch = self.collate(rollouts)
        batch["_bench_step"] = step
        return batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random model, G=4, 2 turns, 8 tokens, 1 pair, 1 thread unless --threads")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or checkpoint directory")
    parser.add_argument("--pairs", type=int, default=2, help="measured steps per arm (after one warm-up each)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-total-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bf16 autocast where the CPU computes bf16 natively, else float32")
    parser.add_argument("--micro-batch-size", type=int, default=4,
                        help="rows per forward/backward in training (bounds activation memory; same gradients)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quiet", action="store_true", help="no per-turn generation progress lines")
    parser.add_argument("--backend", default=None, choices=["hf,vllm"],
                        help="compare the HF (KV-cache) and vLLM generation backends instead of today's path and "
                             "the KV cache (needs vLLM)")
    parser.add_argument("--vllm-sync", default="lora", choices=["lora", "weights"],
                        help="with --backend: hand the engine a new LoRA adapter per version, or merged weights")
    parser.add_argument("--vllm-kv-cache-gib", type=float, default=2.0, help="with --backend: the engine's KV cache")
    args = parser.parse_args(argv)
    if not args.quiet:  # the generator's per-turn progress (turn k of N, rollouts finished, tokens/s)
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("lit_echo.online.generator").setLevel(logging.INFO)
    if args.tiny:
        args.model, args.group_size, args.max_turns, args.max_new_tokens, args.pairs = "tiny-random", 4, 2, 8, 1
        # A smoke test: one thread keeps it at seconds on a machine whose cores are busy (see README).
        args.threads = 1 if args.threads is None else args.threads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bf16 = native_bf16("cpu") if args.dtype == "auto" else args.dtype == "bfloat16"

    import lightning.pytorch as pl

    from lit_echo.module import EchoModule

    torch.manual_seed(0)
    # dtype float32: the module keeps a float32 base; the new arm's bf16 copy is swapped in by BaseWeights.
    module = EchoModule(args.model, lora_rank=16, lora_alpha=32, temperature=args.temperature, world_coef=0.05,
                        lr=1e-4, micro_batch_size=args.micro_batch_size, dtype="float32")
    tokenizer = models.load_tokenizer(args.model)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    arm_names, sampler = ARMS, None
    if args.backend:
        from lit_echo.online.vllm_engine import VLLMSampler, VLLMSettings

        arm_names = BACKEND_ARMS
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the trainer shares the cores
        sampler = VLLMSampler(models.resolve_model_path(args.model),
                              VLLMSettings(kv_cache_gib=args.vllm_kv_cache_gib, sync=args.vllm_sync,
                                           dtype="bfloat16" if bf16 else "float32"),
                              max_total_tokens=args.max_total_tokens, lora_rank=16)
    # Both backends train (and rescore) with the same trainer weights: the new path's bf16 base where native.
    weights = BaseWeights(module.model, {arm_names[0]: None if not args.backend else torch.bfloat16 if bf16 else None,
                                         arm_names[1]: torch.bfloat16 if bf16 else None})
    bench = Bench(args, module, tokenizer, autocast, weights, arm_names, sampler)

    class TimeTraining(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            bench.weights.use(bench.arm_of(batch["_bench_step"]))
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = batch["_bench_step"]
            stats = bench.pending.pop(step)
            if step >= 2:  # the two warm-up steps are not counted
                arm = bench.arms[bench.arm_of(step)]
                arm.train_s.append(time.perf_counter() - self.started)
                arm.stats += stats
                arm.steps += 1
                arm.train_tokens += int(batch["attention_mask"].sum())

    steps = 2 + 2 * args.pairs
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed" if bf16 else "32-true",
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[TimeTraining()], num_sanity_val_steps=0)
    peaks = [peak_matmul_flops(torch.bfloat16 if bf16 else torch.float32)]
    started = time.perf_counter()
    try:
        trainer.fit(module, DataLoader(_Steps(bench, steps), batch_size=None))
    finally:
        if sampler is not None:
            sampler.close()
    wall = time.perf_counter() - started
    peaks.append(peak_matmul_flops(torch.bfloat16 if bf16 else torch.float32))
    peak = max(peaks)

    body, head = linear_parameters(module.model)
    precision = "bf16 autocast (new path: base stored in bf16)" if bf16 else "float32"
    print(f"model {args.model}, {precision}, G = {args.group_size}, up to "
          f"{args.max_turns} turns of {args.max_new_tokens} new tokens, {args.pairs} measured steps per arm "
          f"(ABBA), torch threads {torch.get_num_threads()}, cores {len(os.sched_getaffinity(0))}, "
          f"avx512_bf16 {native_bf16('cpu')}; peak matmul {peak / 1e9:.1f} GFLOP/s; wall {wall:.0f} s")
    header = (f"{'arm':9s} {'prefill s':>9s} {'decode s':>9s} {'env s':>7s} {'gen s':>7s} {'train s':>8s} "
              f"{'step s':>7s} {'prefill tok':>11s} {'sampled':>8s} {'prefill/sampled':>15s} {'gen tok/s':>9s} "
              f"{'FLOP/s of peak':>14s}")
    print(header)
    per_step = {}
    for name in arm_names:
        arm = bench.arms[name]
        s, n = arm.stats, max(arm.steps, 1)
        train = sum(arm.train_s)
        gen_flops = 2 * body * (s.prefill_tokens + s.decode_tokens) + 2 * head * s.decode_tokens
        train_flops = 4 * (body + head) * arm.train_tokens
        flops_fraction = (gen_flops + train_flops) / max(s.seconds + train, 1e-9) / peak
        per_step[name] = {"gen": s.seconds / n, "prefill": s.prefill_s / n, "step": (s.seconds + train) / n,
                          "prefill_per_sampled": s.prefill_tokens / max(s.sampled_tokens, 1)}
        print(f"{name:9s} {s.prefill_s / n:9.2f} {s.decode_s / n:9.2f} {s.env_s / n:7.2f} {s.seconds / n:7.2f} "
              f"{train / n:8.2f} {(s.seconds + train) / n:7.2f} {s.prefill_tokens / n:11.0f} "
              f"{s.sampled_tokens / n:8.0f} {per_step[name]['prefill_per_sampled']:15.2f} "
              f"{s.sampled_tokens / max(s.seconds, 1e-9):9.1f} {flops_fraction:14.3f}")
    if args.backend:
        _print_backends(bench, per_step, sampler)
        return
    old, new = per_step["generate"], per_step["kv_cache"]
    print(f"ratios (today / KV cache): generation time {old['gen'] / new['gen']:.2f}x, prefill time "
          f"{old['prefill'] / max(new['prefill'], 1e-9):.2f}x, prefill tokens per sampled token "
          f"{old['prefill_per_sampled'] / max(new['prefill_per_sampled'], 1e-9):.2f}x, end-to-end step "
          f"{old['step'] / new['step']:.2f}x (median train s per step: "
          f"{statistics.median(bench.arms['generate'].train_s):.2f} / "
          f"{statistics.median(bench.arms['kv_cache'].train_s):.2f})")


def _print_backends(bench: Bench, per_step: dict, sampler) -> None:
    """The vLLM arm's own phases and mismatch, and the ratios HF / vLLM."""
    s, n = bench.arms["vllm"].stats, max(bench.arms["vllm"].steps, 1)
    metrics = s.metrics()
    print(f"vllm: engine start-up {sampler.start_s:.1f} s (once, not in the step times); per step: sync "
          f"{s.sync_s / n:.2f} s ({sampler.settings.sync}), engine generate {s.decode_s / n:.2f} s, rescore "
          f"{s.rescore_s / n:.2f} s, environment {s.env_s / n:.2f} s; prompt positions the prefix cache missed per "
          f"sampled token {s.prefill_tokens / max(s.sampled_tokens, 1):.2f}; log-prob mismatch over "
          f"{s.logprob_tokens} ACTION tokens: mean |diff| {metrics.get('rollout/logprob_diff_mean', 0):.4f}, max "
          f"{metrics.get('rollout/logprob_diff_max', 0):.4f}, KL {metrics.get('rollout/logprob_kl', 0):.2e}")
    hf, vllm = per_step["hf"], per_step["vllm"]
    print(f"ratios (HF / vLLM): generation time {hf['gen'] / vllm['gen']:.2f}x, end-to-end step "
          f"{hf['step'] / vllm['step']:.2f}x (median train s per step: "
          f"{statistics.median(bench.arms['hf'].train_s):.2f} / {statistics.median(bench.arms['vllm'].train_s):.2f})")


if __name__ == "__main__":
    main()
