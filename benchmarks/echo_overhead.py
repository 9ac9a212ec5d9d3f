"""Step-time overhead of ECHO (world_coef=0.05) over action masking (world_coef=0) on a real small model.

Claim: adding the world-model term costs <= 1.03x the step time of the action-masking baseline, because both use the
same forward pass and the same per-token log-probs; only the loss reads more tokens.

One training step = forward of a randomly initialised Qwen2 (``lit_echo.tiny.build_tiny_model``), log-probs through
its (tied, trainable) LM head on the ACTION / OBSERVATION / WARNING targets (``target_logprobs``, as EchoModule does;
the sampling temperature on ACTION targets), ``echo_loss``, backward. Both settings score the same positions (the
module logs the world NLL under action masking too), so only the loss differs.
Both settings train on the same synthetic agent batch (prompt, then turns of ACTION / template / OBSERVATION /
template tokens, about 60% observation targets) and run interleaved, A B A B ..., after warm-up steps; the printed
ratio is the median over pairs of (ECHO time / baseline time).

    python benchmarks/echo_overhead.py            # hidden 384, 6 layers, vocab 49,152, batch 4 x 256, 10 pairs
    python benchmarks/echo_overhead.py --quick    # batch 2 x 256, 5 pairs
    python benchmarks/echo_overhead.py --tiny     # hidden 64, 2 layers, vocab 2,048, batch 2 x 128, 2 pairs: seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lit_echo.logprobs import target_logprobs  # noqa: E402
from lit_echo.losses import echo_loss  # noqa: E402
from lit_echo.roles import Role  # noqa: E402
from lit_echo.tiny import build_tiny_model  # noqa: E402


def agent_batch(batch: int, length: int, vocab: int, seed: int = 0):
    """Token ids [B, L] and target roles [B, L - 1] laid out like multi-turn agent rollouts."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=gen)  # [B, L]
    roles = torch.full((batch, length), int(Role.CONTEXT))  # [B, L] role of each token
    turn = [(Role.ACTION, 24), (Role.CONTEXT, 4), (Role.OBSERVATION, 48), (Role.CONTEXT, 4)]
    for i in range(batch):
        position = 32 + 8 * i  # prompt, different lengths per row
        while position < length - 16 * i:  # ragged ends: trailing padding stays CONTEXT
            for role, size in turn:
                roles[i, position:position + size] = int(role)
                position += size
        roles[i, length - 16 * i:] = int(Role.CONTEXT)
    return input_ids, roles[:, 1:]  # position t predicts token t + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch: a smoke test in seconds")
    parser.add_argument("--hidden-size", type=int, default=None, help="default 384 (64 with --tiny)")
    parser.add_argument("--layers", type=int, default=None, help="default 6 (2 with --tiny)")
    parser.add_argument("--vocab", type=int, default=None, help="default 49,152 (2,048 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="default 4 (2 with --quick or --tiny)")
    parser.add_argument("--length", type=int, default=None, help="default 256 (128 with --tiny)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="timed ECHO/baseline pairs (default 10, 5 with --quick, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (1 with --tiny)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    args.hidden_size = args.hidden_size or (64 if args.tiny else 384)
    args.layers = args.layers or (2 if args.tiny else 6)
    args.vocab = args.vocab or (2048 if args.tiny else 49_152)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    batch = args.batch or (2 if args.quick or args.tiny else 4)
    length = args.length or (128 if args.tiny else 256)
    pairs = args.pairs or (2 if args.tiny else 5 if args.quick else 10)

    model = build_tiny_model(args.vocab, hidden_size=args.hidden_size, num_layers=args.layers)
    model.train()
    input_ids, roles = agent_batch(batch, length, args.vocab)
    targets = input_ids[:, 1:]  # [B, T]
    attention_mask = torch.ones_like(input_ids)
    advantages = torch.randn(batch, generator=torch.Generator().manual_seed(1))  # [B]
    action = roles == Role.ACTION  # [B, T]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def logprobs():
        with autocast:
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
            return target_logprobs(hidden[:, :-1], model.lm_head, targets, roles, temperature=0.8)  # [B, T]

    with torch.no_grad():
        old_logprobs = logprobs() + 0.05 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))

    def step(world_coef: float) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out = echo_loss(logprobs(), roles, advantages, old_logprobs, world_coef=world_coef, clip_high=0.28)
        out.loss.backward()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(0.05)
        step(0.0)
    echo_times, base_times, ratios = [], [], []
    for k in range(pairs):
        if k % 2 == 0:  # alternate which setting goes first
            echo, base = step(0.05), step(0.0)
        else:
            base, echo = step(0.0), step(0.05)
        echo_times.append(echo)
        base_times.append(base)
        ratios.append(echo / base)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    share = float((roles == Role.OBSERVATION).float().mean())
    print(f"# torch {torch.__version__}, cpu, {os.cpu_count()} CPU cores ({platform.machine()}), "
          f"{'bf16 autocast' if args.bf16 else 'float32'}")
    print(f"# Qwen2 random init: hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab} "
          f"({params:.1f}M params); batch {batch} x {length}; observation targets {share:.0%}, "
          f"action targets {float(action.float().mean()):.0%}; {pairs} interleaved pairs after {args.warmup} warm-up")
    print(f"action masking (world_coef=0):   median step {statistics.median(base_times):.3f} s")
    print(f"ECHO           (world_coef=0.05): median step {statistics.median(echo_times):.3f} s")
    print(f"ECHO / action masking: median of paired ratios {statistics.median(ratios):.3f}x "
          f"(ratio of medians {statistics.median(echo_times) / statistics.median(base_times):.3f}x)")


if __name__ == "__main__":
    main()
