"""Training tokens/s of one optimizer step: today's path against the new one, alternating in one run.

Claim (issue 9): the new training step is >= 1.3x faster on a demo-like batch. Both paths compute the same loss and
gradients (tests/test_module.py::test_step_equals_todays_path); the script prints their largest gradient difference
as a check.

* today's path: the batch's micro-batches in their original order at the full padded width; the LM head, its
  softmax and the entropy on every position (``chunked_logprobs`` over [B, T-1]); ``echo_loss``; backward.
* new path: ``EchoModule.forward_backward``: rows sorted by length, each micro-batch cut to its own longest row;
  the head only on ACTION / OBSERVATION / WARNING targets, the entropy only on ACTION targets; under bf16 the
  frozen float32 base stored in bf16 (what ``EchoModule(dtype="auto")`` does under ``bf16-mixed``), where today's
  path cast every weight at every forward. The gradient check then differs by bf16 rounding of the residual stream;
  ``--same-base`` keeps today's float32 base in both arms (gradients equal to float rounding).

The batch: 8 rollouts of ShellWorld expert data (``data/shellworld/expert-train.jsonl.gz``) rendered with the model's
chat template, random advantages, on-policy. SmolLM2-135M-Instruct + LoRA (rank 16, all linear layers), temperature
0.8, world_coef 0.05, bf16 autocast where the CPU has native bf16 (as Lightning's bf16-mixed), else float32.

    python benchmarks/train_step.py                       # SmolLM2-135M-Instruct, the demo's batch (8 rollouts)
    python benchmarks/train_step.py --micro-batch-size 4  # two passes per step
    python benchmarks/train_step.py --tiny                # the tiny random model, seconds (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from base_weights import BaseWeights  # noqa: E402  (benchmarks/, the script's own folder)

from lit_echo import models  # noqa: E402
from lit_echo.logprobs import chunked_logprobs  # noqa: E402
from lit_echo.losses import compute_normalizers, echo_loss  # noqa: E402
from lit_echo.roles import Role  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data/shellworld/expert-train.jsonl.gz")
TINY_DATA = os.path.join(REPO, "data/sample/train.jsonl")  # short rollouts that fit the tiny tokenizer's 256 tokens


def bf16_is_native() -> bool:
    """Native bf16 matmuls on this CPU (avx512_bf16 / AMX); elsewhere bf16 autocast is several times slower."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def todays_step(module, batch) -> torch.Tensor:
    """The training step as it was: micro-batches in batch order, full width, head and entropy everywhere."""
    h = module.hparams
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # [B, T]
    target_roles = batch["roles"][:, 1:]  # [B, T-1]
    old = batch["old_logprobs"][:, 1:]
    rows = input_ids.shape[0]
    size = h.micro_batch_size or rows
    slices = [slice(s, min(s + size, rows)) for s in range(0, rows, size)]
    normalizers = compute_normalizers([target_roles[s] for s in slices], world_target=module.loss_config.world_target)
    total = torch.zeros(())
    for s in slices:
        hidden = models.hidden_states(module.model, input_ids[s], attention_mask[s])[:, :-1]  # [b, T-1, H]
        logp, _ = chunked_logprobs(hidden, models.output_head(module.model), input_ids[s, 1:],
                                   temperature=h.temperature, temperature_mask=target_roles[s] == Role.ACTION,
                                   chunk_size=h.logprob_chunk_size, return_entropy=True)
        out = echo_loss(logp, target_roles[s], batch["advantages"][s], old[s], config=module.loss_config,
                        normalizers=normalizers)
        out.loss.backward()
        total = total + out.loss.detach()
    return total


def new_step(module, batch) -> torch.Tensor:
    loss, _ = module.forward_backward(batch, lambda loss, last: loss.backward())
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random model, 4 sample rollouts (data/sample) of <= 256 tokens, 2 pairs: seconds")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rollouts", type=int, default=None, help="default 8 (4 with --tiny)")
    parser.add_argument("--max-length", type=int, default=None, help="default 1024 (256 with --tiny)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole step in one pass")
    parser.add_argument("--pairs", type=int, default=None, help="timed (today, new) pairs (default 5; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast where the CPU has native bf16, else float32")
    parser.add_argument("--same-base", action="store_true",
                        help="both arms on today's float32 base (isolates the head/padding savings)")
    args = parser.parse_args()
    pairs = args.pairs or (2 if args.tiny else 5)
    rollouts = args.rollouts or (4 if args.tiny else 8)
    max_length = args.max_length or (256 if args.tiny else 1024)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_is_native())

    from lit_echo import EchoModule, RolloutDataModule

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if args.tiny:
            from lit_echo.tiny import save_tiny_checkpoint

            model_path = str(save_tiny_checkpoint(tmp))
        model_path = models.resolve_model_path(model_path)
        torch.manual_seed(0)
        module = EchoModule(model_path, lora_rank=16, lora_alpha=32, temperature=0.8, world_coef=0.05,
                            micro_batch_size=args.micro_batch_size)
        data = RolloutDataModule(TINY_DATA if args.tiny else DATA, tokenizer=model_path, batch_size=rollouts,
                                 max_length=max_length, shuffle=False)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
    gen = torch.Generator().manual_seed(1)
    batch["advantages"] = torch.randn(rollouts, generator=gen)  # [B] as GRPO would give
    for name, p in module.model.named_parameters():  # a trained-looking adapter: every LoRA matrix gets a gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.02, generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    weights = BaseWeights(module.model, {todays_step.__name__: None,
                                         new_step.__name__: torch.bfloat16 if bf16 and not args.same_base else None})

    def timed(step) -> tuple[float, dict[str, torch.Tensor]]:
        weights.use(step.__name__)
        module.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast:
            step(module, batch)
        elapsed = time.perf_counter() - start
        return elapsed, {n: p.grad.float().clone() for n, p in module.model.named_parameters() if p.grad is not None}

    for _ in range(args.warmup):
        timed(todays_step)
        timed(new_step)
    old_times, new_times, ratios = [], [], []
    for k in range(pairs):
        if k % 2 == 0:  # alternate which path goes first
            old, old_grads = timed(todays_step)
            new, new_grads = timed(new_step)
        else:
            new, new_grads = timed(new_step)
            old, old_grads = timed(todays_step)
        old_times.append(old)
        new_times.append(new)
        ratios.append(old / new)
    grad_diff = max(float((new_grads[n] - old_grads[n]).abs().max() / old_grads[n].abs().max().clamp_min(1e-30))
                    for n in old_grads)

    tokens = int(batch["attention_mask"].sum())
    rows, width = batch["input_ids"].shape
    roles = batch["roles"][:, 1:]
    scored = int((roles != Role.CONTEXT).sum())
    print(f"# torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"avx512_bf16: {'yes' if bf16_is_native() else 'no'}, {'bf16 autocast' if bf16 else 'float32'}")
    print(f"# {'tiny random Qwen2' if args.tiny else args.model} + LoRA r16; batch {rows} rollouts, "
          f"padded width {width}, {tokens} real tokens ({tokens / (rows * width):.0%} of the padded batch); "
          f"head positions: today {rows * (width - 1)}, new {scored}; micro_batch_size {args.micro_batch_size}; "
          f"{pairs} pairs after {args.warmup} warm-up; new path's base: "
          f"{'bf16' if bf16 and not args.same_base else 'as loaded (float32)'}")
    print(f"today's path: median step {statistics.median(old_times):.3f} s, "
          f"{tokens / statistics.median(old_times):.0f} training tokens/s")
    print(f"new path:     median step {statistics.median(new_times):.3f} s, "
          f"{tokens / statistics.median(new_times):.0f} training tokens/s")
    print(f"new / today tokens/s: median of paired ratios {statistics.median(ratios):.2f}x "
          f"(ratio of medians {statistics.median(old_times) / statistics.median(new_times):.2f}x); "
          f"largest relative gradient difference {grad_diff:.1e}")


if __name__ == "__main__":
    main()
