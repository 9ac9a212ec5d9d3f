"""Every benchmark script runs end to end in its ``--tiny`` mode, so none of them can rot unnoticed.

The figures of a tiny run mean nothing (that is what the full runs in benchmarks/README.md are for); the test checks
that each script starts, measures both arms, and exits 0 (each exits non-zero when an arm fails or disagrees).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["logprob_memory", "echo_overhead", "train_step", "online_step", "generation", "decode_step"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_in_tiny_mode(name, tmp_path):
    script = ROOT / "benchmarks" / f"{name}.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), "--tiny"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{script.name} --tiny exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script.name} --tiny printed nothing"

