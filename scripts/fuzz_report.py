"""Re-measure the reader rows of RELIABILITY.md: seeded hostile lines and damaged files through the real reader.

    python scripts/fuzz_report.py [--cases 10000] [--seed 0]

Prints a markdown table (fault | tried | survived | failed) and the first failures, if any. The same cases run
in the slow test suite (``pytest -m slow tests/test_fuzz_reader.py``), which fails on any failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_reader_cases import run

from lit_echo.tiny import build_tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # skip mode logs every case's bad record; the counts are the result
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        result = run(args.cases, args.seed, Path(directory), build_tiny_tokenizer())
    print(f"{args.cases} cases, seed {args.seed}, {time.perf_counter() - started:.0f} s\n")
    print("| fault | tried | survived (of which rejected) | failed |\n|---|---|---|---|")
    names = {"lines": "hostile record lines (raise + skip mode, then collated)",
             "files": "damaged / empty / BOM files (raise + skip mode)"}
    for kind, name in names.items():
        row = result[kind]
        print(f"| {name} | {row['tried']} | {row['survived']} ({row['rejected']}) | {row['failed']} |")
    for example in result["examples"]:
        print("\nFAILED:", example)
    sys.exit(1 if result["examples"] else 0)


if __name__ == "__main__":
    main()
