"""One decode step of a group (one token for each of G rows after a shared prompt), by weight dtype and attention.

What a decode step of the online loop costs on this machine, and which of the two levers of the new path pays:
the frozen base stored in bf16 (no per-forward weight cast under bf16 autocast) and grouped-query decode
attention (``lit_echo.online.attention``: no copy of the KV cache per step; PyTorch's CPU SDPA is slow for one
query in bf16). Arms, alternated round by round in one run:

* ``float32 base, sdpa`` / ``eager`` / ``grouped``: the base as loaded (float32), under bf16 autocast where the CPU
  has native bf16 (today's setting), else plain float32.
* ``bf16 base, sdpa`` / ``eager`` / ``grouped`` (only where bf16 is native): the frozen base stored in bf16.

Printed: median milliseconds per decode step of each arm, its speed-up over today's arm (float32 base, sdpa) as
the ratio of medians, and the median of the per-round paired ratios (each round runs every arm once, in
alternating order, so a load swing hits the arms of a round alike).

    python benchmarks/decode_step.py            # SmolLM2-135M-Instruct + LoRA r16, 8 rows, 400-token prompt
    python benchmarks/decode_step.py --tiny     # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from base_weights import BaseWeights  # noqa: E402  (benchmarks/, the script's own folder)

from lit_echo import models
from lit_echo.online.attention import decode_attention
from lit_echo.online.decoding import CachedRows
from lit_echo.precision import native_bf16


def decode_ms(model, rows: int, prompt: list[int], steps: int, attention: str, bf16: bool) -> float:
    """Median ms of ``steps`` decode steps of ``rows`` rows after ``prompt`` (prefill not timed)."""
    cached = CachedRows(model, pad_token_id=0, grouped_decode=attention == "grouped")
    times = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        cached.start([prompt] * rows)
        tokens = torch.full((rows,), 42)
        with decode_attention(model, "eager") if attention == "eager" else contextlib.nullcontext():
            for _ in range(steps + 1):  # the first step warms up
                started = time.perf_counter()
                cached.step(tokens, [True] * rows)
                times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model, 4 rows, 40-token prompt: seconds")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared cores)")
    parser.add_argument("--attention", default="sdpa,eager,grouped",
                        help="comma-separated attention arms (sdpa, today's, is always measured)")
    args = parser.parse_args()
    model_name = "smollm2-135m-instruct"
    if args.tiny:
        model_name, args.rows, args.prompt_tokens, args.steps, args.rounds = "tiny-random", 4, 40, 5, 1
    torch.set_num_threads(args.threads)
    bf16 = native_bf16("cpu")
    torch.manual_seed(0)
    model = models.build_model(model_name, lora_rank=16, lora_alpha=32).eval()
    for name, param in model.named_parameters():  # a trained-looking adapter, so the LoRA path really computes
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    weights = BaseWeights(model, {"float32 base": None, **({"bf16 base": torch.bfloat16} if bf16 else {})})
    prompt = [100 + (7 * i) % 1000 for i in range(args.prompt_tokens)]
    wanted = [a for a in args.attention.split(",") if a]
    unknown = sorted(set(wanted) - {"sdpa", "eager", "grouped"})
    if unknown:
        parser.error(f"--attention: unknown arm(s) {unknown}; expected a comma-separated list of sdpa, eager, "
                     "grouped")
    attentions = ["sdpa"] + [a for a in ("eager", "grouped") if a in wanted]
    arms = [(base, attention) for base in weights.copies for attention in attentions]
    results: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        for base, attention in (arms if round_ % 2 == 0 else arms[::-1]):
            weights.use(base)
            results[base, attention].append(decode_ms(model, args.rows, prompt, args.steps, attention, bf16))
    today = statistics.median(results["float32 base", "sdpa"])
    print(f"# {model_name} + LoRA r16, {args.rows} rows after a {args.prompt_tokens}-token prompt, "
          f"{'bf16 autocast' if bf16 else 'float32'} (avx512_bf16: {bf16}), {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    baseline = results["float32 base", "sdpa"]
    for base, attention in arms:
        ms = statistics.median(results[base, attention])
        paired = statistics.median(t / m for t, m in zip(baseline, results[base, attention]))
        print(f"{base:13s} {attention:8s} {ms:8.1f} ms per decode step  {today / ms:5.2f}x today's "
              f"(median of paired ratios {paired:.2f}x)")


if __name__ == "__main__":
    main()
