"""The lit-echo CLI: every recipe parses, the tiny recipe trains and logs the documented metrics, every option is
described, only working subcommands are offered, and Trainer options the module replaces are named early."""

import inspect
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_echo.cli import AutoPrecisionTrainer, EchoCLI, run
from lit_echo.cli import main as cli_main
from lit_echo.data.datamodule import RolloutDataModule
from lit_echo.module import EchoModule

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


def test_sampling_path_is_set_from_the_command_line(tmp_path):
    """data.kv_cache reaches the generator's SamplingSettings (it could not be set from the CLI or YAML)."""
    settings = {}
    for value in ("false", "true"):
        cli = EchoCLI(EchoModule, RolloutDataModule, subclass_mode_data=True, run=False,
                      auto_configure_optimizers=False, trainer_class=AutoPrecisionTrainer,
                      args=["--config", str(REPO / "configs" / "tiny-online.yaml"), "--data.kv_cache", value,
                            "--trainer.default_root_dir", str(tmp_path)])
        settings[value] = cli.datamodule._settings(1.0).kv_cache
    assert settings == {"false": False, "true": True}


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
    assert "hp_metric" not in scalars
    assert len(acc.Scalars("losses/total")) == 6 and len(acc.Scalars("val/world/nll_observation")) == 2


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _option_descriptions(help_text: str, prefix: str) -> dict[str, str]:
    """``{"--model.lr": "peak learning rate ..."}`` from argparse help: the text of each option minus its type."""
    options: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(rf"^  ({re.escape(prefix)}\.\w+)\b(.*)$", line)
        if match:
            current = match.group(1)
            parts = re.split(r"\s{2,}", match.group(2).strip(), maxsplit=1)  # "LR", or "SEED      (type: ...)"
            options[current] = [parts[1]] if len(parts) == 2 else []
        elif current and re.match(r"^ {6,}\S", line):
            options[current].append(line.strip())
        else:
            current = None
    return {name: " ".join(text).split("(type:")[0].strip() for name, text in options.items()
            if not name.endswith(".help")}


def test_help_describes_every_model_option(capsys):
    described = _option_descriptions(_help(capsys, "fit"), "--model")
    arguments = [name for name in inspect.signature(EchoModule.__init__).parameters if name != "self"]
    assert sorted(described) == sorted(f"--model.{name}" for name in arguments)
    assert not [name for name, text in described.items() if not text]
    assert "Trainer's accumulate_grad_batches" in " ".join(described["--model.micro_batch_size"].split())


@pytest.mark.parametrize("data_class", ["lit_echo.RolloutDataModule", "lit_echo.online.OnlineRolloutDataModule"])
def test_help_describes_every_data_option(data_class, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--data.help", data_class])
    described = _option_descriptions(capsys.readouterr().out, "--data")
    assert len(described) >= 10
    assert not [name for name, text in described.items() if not text]


def test_only_working_subcommands_are_offered(capsys):
    main_help = _help(capsys)
    assert re.search(r"^\s+fit\s", main_help, re.MULTILINE) and re.search(r"^\s+validate\s", main_help, re.MULTILINE)
    assert not re.search(r"^\s+(test|predict)\s", main_help, re.MULTILINE)
    flat = " ".join(main_help.split())
    assert "lit-echo evaluate --help" in flat and "lit-echo export --help" in flat
    with pytest.raises(SystemExit) as exit_info:
        run(["test", "--config", "configs/tiny.yaml"])
    assert exit_info.value.code == 2 and "invalid choice: 'test'" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, points_to", [("accumulate_grad_batches", "2", "model.micro_batch_size"),
                                                      ("gradient_clip_val", "0.5", "model.gradient_clip_val")])
def test_trainer_options_replaced_by_the_module_are_named_before_the_model_loads(option, value, points_to, capsys):
    os.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:  # the model path does not exist: nothing was loaded yet
        run(["fit", "--config", "configs/tiny.yaml", f"--trainer.{option}", value,
             "--model.model_name_or_path", "/nonexistent/model"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"trainer.{option}={value}" in err and points_to in err


def test_validate_runs_on_the_held_out_buffer_and_package_logs_are_shown(tmp_path, capsys, monkeypatch):
    os.chdir(REPO)
    # As under the lit-echo command: no logging configured anywhere (pytest adds handlers to the root logger).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger("lit_echo"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("lit_echo"), "level", logging.NOTSET)
    cli = run(["validate", "--config", "configs/tiny.yaml", "--trainer.logger", "false",
               "--trainer.limit_val_batches", "2", f"--trainer.default_root_dir={tmp_path}"])
    assert re.search(r"lit_echo\.module: tiny-random: trainable params: [\d,]+ / [\d,]+", capsys.readouterr().err)
    metrics = cli.trainer.callback_metrics
    assert any(name.startswith("val/world") for name in metrics) and all(
        torch.isfinite(value) for value in metrics.values())


def test_evaluate_is_reachable_from_lit_echo(tiny_checkpoint, tmp_path, capsys):
    cli_main(["evaluate", "--model", str(tiny_checkpoint), "--seeds", "0:1", "--samples", "2", "--max-turns", "1",
              "--max-new-tokens", "4", "--precision", "fp32", "--out", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["rollouts"] == 2 and json.loads(capsys.readouterr().out) == result
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--help"])
    assert "usage: lit-echo evaluate" in capsys.readouterr().out
