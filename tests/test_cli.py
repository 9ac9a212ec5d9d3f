"""The lit-echo CLI: every recipe under configs/ parses, and the tiny recipe trains and logs the documented metrics."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_echo.cli import run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DOCUMENTED = ["losses/total", "losses/policy", "losses/world", "world/nll_observation", "world/nll_warning",
              "world/observation_tokens", "world/warning_tokens", "policy/clipfrac", "policy/ratio_mean",
              "policy/approx_kl", "policy/entropy", "policy/nll_action", "world/policy_ratio",
              "perf/train_tokens_per_s", "optim/lr", "val/world/nll_observation", "val/world/acc_observation"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config):
    out = subprocess.run([sys.executable, "-m", "lit_echo.cli", "fit", "--config", str(config), "--print_config"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["model_name_or_path"] and printed["data"]["class_path"]


def test_tiny_recipe_trains_and_logs_documented_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    os.chdir(REPO)
    run(["fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
          f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--model.world_coef", "0.3"])
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert all(name in scalars for name in DOCUMENTED), set(DOCUMENTED) - set(scalars)
    assert len(acc.Scalars("losses/total")) == 6 and len(acc.Scalars("val/world/nll_observation")) == 2
