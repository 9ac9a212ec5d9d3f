"""The held-out evaluation tool on the tiny model: agent metrics from real ShellWorld episodes, world metrics."""

import json
from pathlib import Path

from lit_echo.evaluate import main

REPO = Path(__file__).resolve().parents[1]


def test_evaluate_reports_agent_and_world_metrics(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    result = main(["--model", str(tiny_checkpoint), "--seeds", "0:2", "--samples", "2", "--max-turns", "2",
                   "--max-new-tokens", "6", "--world-buffer", str(REPO / "data/sample/val.jsonl"),
                   "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["rollouts"] == 4 and 0.0 <= result["success_rate"] <= 1.0
    assert 0.0 <= result["valid_action_rate"] <= 1.0 and 1.0 <= result["turns_mean"] <= 2.0
    assert result["world_tokens"] > 0 and result["world_nll"] > 0 and 0.0 <= result["world_acc"] <= 1.0
