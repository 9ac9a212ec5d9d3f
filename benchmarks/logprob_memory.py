"""Peak memory and time of chunked log-probs vs full log_softmax and vs TRL's selective_log_softmax.

Claim: ``lit_echo.logprobs.chunked_logprobs`` (forward + backward through the LM head) needs <= 0.25x the peak memory
of the naive full-logits computation, less than TRL's ``selective_log_softmax`` applied to the model's logits, in
<= 1.2x the naive time.

Each (method, vocab, length, head) case runs in a fresh subprocess so peaks do not mix:
* CPU: peak = ``ru_maxrss`` after the first forward+backward minus the RSS just before it (glibc returns large
  blocks to the OS, so RSS follows live tensors). The case fails loudly if ``ru_maxrss`` did not grow during the
  run (an earlier peak would hide it).
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the run.
The peak includes the gradient buffers every method needs (d hidden and, for a trainable head, d W: V x H float32).
Time: the memory run's own time plus ``--repeats`` rounds in one more subprocess per case that runs the methods
interleaved (the machine may be shared; interleaving spreads a slowdown over all methods); the median is reported.

TRL comes with the ``bench`` extra (``pip install -e ".[bench]"``, which pins the version the README quotes); without
it the TRL column is left out with a note (or, with ``--methods trl``, the run stops saying what to install). On CPU
TRL runs its pure-torch path (no Triton kernel).

    python benchmarks/logprob_memory.py            # vocab 49,152 and 151,936, length 1,024 and 4,096, both heads
    python benchmarks/logprob_memory.py --quick    # length 1,024, trainable head only
    python benchmarks/logprob_memory.py --tiny     # seconds: a smoke run of every code path (tests run it); its
                                                   # sizes are too small for meaningful memory figures

The exit status is 1 when a measurement failed or a method's log-probs/gradients disagree with the naive ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("chunked", "naive", "trl")
_TRL_INSTALL = 'pip install -e ".[bench]"  (pins the TRL version the README quotes)'
# --tiny: every code path (subprocesses, both heads, several chunks per sequence) in seconds.
_TINY = dict(vocab=[512], length=[64], hidden_size=32, chunk_size=16)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(vocab, length, batch, hidden_size, head, device):
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(batch, length, hidden_size, device=device, requires_grad=True)  # [B, T, H]
    weight = torch.randn(vocab, hidden_size, device=device).mul_(0.02)  # [V, H], in place: no setup peak
    weight.requires_grad_(head == "trainable")
    targets = torch.randint(0, vocab, (batch, length), device=device)  # [B, T]
    upstream = torch.randn(batch, length, device=device)  # d loss / d logp, as a loss would give
    return hidden, weight, targets, upstream


def _step_fn(method, hidden, weight, targets, upstream, chunk_size, device):
    import torch
    import torch.nn.functional as F

    from lit_echo.logprobs import chunked_logprobs, naive_logprobs

    if method == "chunked":
        def logprobs():
            return chunked_logprobs(hidden, weight, targets, chunk_size=chunk_size)
    elif method == "naive":
        def logprobs():
            return naive_logprobs(hidden, weight, targets)
    else:
        from trl.trainer.utils import selective_log_softmax

        def logprobs():
            logits = F.linear(hidden, weight)  # [B, T, V]: what model(...).logits hands TRL
            return selective_log_softmax(logits, targets)

    def step():
        hidden.grad = None
        weight.grad = None
        logp = logprobs()
        (logp * upstream).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return logp.detach()

    return step


def measure_memory(method, vocab, length, batch, hidden_size, head, chunk_size, device, require_growth=True) -> dict:
    """One forward + backward in this fresh process; peak bytes above the state before it.

    ``require_growth=False`` (``--tiny``) accepts a run too small to raise ``ru_maxrss``; its peak is then 0.
    """
    import torch

    hidden, weight, targets, upstream = _setup(vocab, length, batch, hidden_size, head, device)
    step = _step_fn(method, hidden, weight, targets, upstream, chunk_size, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        logp = step()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        logp = step()
        seconds = time.perf_counter() - start
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if peak_after <= peak_before and require_growth:
            raise RuntimeError("ru_maxrss did not grow during the run: an earlier peak hides this one")
        peak = peak_after - base
    grad_bytes = 4 * hidden.numel() + (4 * weight.numel() if weight.requires_grad else 0)
    return {"peak_bytes": peak, "grad_bytes": grad_bytes, "time_s": seconds, "logp_sum": float(logp.sum()),
            "grad_hidden_norm": float(hidden.grad.norm())}


def measure_time(methods, vocab, length, batch, hidden_size, head, chunk_size, device, repeats) -> dict:
    """Methods interleaved round by round in one process (fair under a shared, noisy machine)."""
    hidden, weight, targets, upstream = _setup(vocab, length, batch, hidden_size, head, device)
    steps = {m: _step_fn(m, hidden, weight, targets, upstream, chunk_size, device) for m in methods}
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for method in methods:
            start = time.perf_counter()
            steps[method]()
            times[method].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="length 1,024 only, trainable head only")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run in seconds: vocab 512, length 64, hidden 32, chunk 16 (memory figures not "
                             "meaningful)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49_152, 151_936])
    parser.add_argument("--length", type=int, nargs="+", default=None, help="default 1024 4096 (1024 with --quick)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=576, help="576 = SmolLM2-135M")
    parser.add_argument("--head", choices=["trainable", "frozen", "both"], default="both",
                        help="trainable: full fine-tuning (d W too); frozen: LoRA with a frozen (tied) head")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: lit_echo's automatic choice")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved timed rounds per case, on top of the memory run's own timing")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="default: all three, TRL only when installed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # child process: one measurement, one JSON line
        job = json.loads(args.child)
        kind = job.pop("kind")
        result = measure_memory(**job) if kind == "memory" else measure_time(**job)
        print(json.dumps(result))
        return

    if args.tiny:
        for name, value in _TINY.items():
            setattr(args, name, value)
    methods = args.methods or list(METHODS)
    if "trl" in methods and importlib.util.find_spec("trl") is None:
        if args.methods:
            parser.error(f"--methods trl needs TRL: {_TRL_INSTALL}")
        print(f"# TRL is not installed: its columns are left out. For the comparison: {_TRL_INSTALL}")
        methods.remove("trl")
    lengths = args.length or ([1024] if args.quick else [1024, 4096])
    repeats = args.repeats
    heads = ["trainable", "frozen"] if args.head == "both" else [args.head]
    if args.quick and args.head == "both":
        heads = ["trainable"]
    import platform

    import torch
    print(f"# torch {torch.__version__}, {args.device}, {os.cpu_count()} CPU cores ({platform.machine()}), "
          f"batch {args.batch}, hidden {args.hidden_size}, chunk {args.chunk_size or 'auto'}, "
          f"time = median of the memory run and {repeats} interleaved round(s)")
    print("# peak MiB = whole forward+backward; 'work' = peak minus the d hidden / d W gradient buffers all need")
    print(f"{'head':9} {'vocab':>7} {'len':>5} | " + " ".join(f"{m + ' MiB':>11}" for m in methods)
          + " | " + " ".join(f"{m + ' s':>9}" for m in methods)
          + " | mem chunk/naive chunk/trl (work: chunk/naive chunk/trl) | time chunk/naive trl/naive")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      os.environ.get("PYTHONPATH", "")]))

    failures = 0

    def child(job):
        nonlocal failures
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            failures += 1
            print(f"{job} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for head in heads:
        for vocab in args.vocab:
            for length in lengths:
                shape = dict(vocab=vocab, length=length, batch=args.batch, hidden_size=args.hidden_size, head=head,
                             chunk_size=args.chunk_size, device=args.device)
                results = {}
                for method in methods:
                    res = child(dict(kind="memory", method=method, require_growth=not args.tiny, **shape))
                    if res is not None:
                        results[method] = res
                times = child(dict(kind="time", methods=list(results), repeats=repeats, **shape)) or {}
                for method, seconds in times.items():  # the memory run is one more timing sample
                    results[method]["time_s"] = statistics.median([results[method]["time_s"], *seconds])
                failures += _count_disagreements(results)
                print(_row(head, vocab, length, methods, results), flush=True)
    if failures:
        print(f"{failures} measurement(s) failed or disagreed with naive; see above", file=sys.stderr)
        sys.exit(1)


def _count_disagreements(results: dict) -> int:
    if "naive" not in results:
        return 0
    ref = results["naive"]
    wrong = 0
    for method, res in results.items():
        for key in ("logp_sum", "grad_hidden_norm"):
            if abs(res[key] - ref[key]) > 1e-3 * max(1.0, abs(ref[key])):
                print(f"ERROR: {method} {key}={res[key]} differs from naive {ref[key]}", file=sys.stderr)
                wrong += 1
    return wrong


def _row(head, vocab, length, methods, results) -> str:
    def mib(m):
        return f"{results[m]['peak_bytes'] / 2**20:11.0f}" if m in results else f"{'-':>11}"

    def sec(m):
        return f"{results[m]['time_s']:9.2f}" if "time_s" in results.get(m, {}) else f"{'-':>9}"

    def ratio(a, b, key, minus=None):
        if a not in results or b not in results or key not in results[a] or key not in results[b]:
            return "-"
        num, den = results[a][key], results[b][key]
        if minus:
            num, den = num - results[a][minus], den - results[b][minus]
        return f"{num / den:.3f}"

    return (f"{head:9} {vocab:7d} {length:5d} | " + " ".join(mib(m) for m in methods) + " | "
            + " ".join(sec(m) for m in methods)
            + f" | {ratio('chunked', 'naive', 'peak_bytes'):>15} {ratio('chunked', 'trl', 'peak_bytes'):>9}"
            + f" ({ratio('chunked', 'naive', 'peak_bytes', 'grad_bytes'):>11} "
              f"{ratio('chunked', 'trl', 'peak_bytes', 'grad_bytes'):>9})"
            + f" | {ratio('chunked', 'naive', 'time_s'):>16} {ratio('trl', 'naive', 'time_s'):>9}")


if __name__ == "__main__":
    main()
