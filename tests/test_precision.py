"""``precision: auto``: the resolver's rule on both kinds of hardware, and the recipes that use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_echo.cli import AutoPrecisionTrainer, run
from lit_echo.precision import native_bf16, resolve_precision

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("device,native,expected", [
    ("cpu", True, "bf16-mixed"),
    ("cpu", False, "32-true"),
    ("cuda", True, "bf16-mixed"),
    ("cuda", False, "16-mixed"),
    ("mps", False, "32-true"),
])
def test_auto_follows_native_bf16(device, native, expected):
    precision, reason = resolve_precision("auto", device, bf16_is_native=native)
    assert precision == expected and reason


@pytest.mark.parametrize("given", ["bf16-mixed", "32-true", 16, None])
def test_other_values_are_kept(given):
    assert resolve_precision(given, "cpu", bf16_is_native=False)[0] == given


def test_the_trainer_resolves_auto_on_this_machine(caplog):
    caplog.set_level("INFO", logger="lit_echo")
    trainer = AutoPrecisionTrainer(precision="auto", accelerator="cpu", devices=1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False)
    expected = "bf16-mixed" if native_bf16("cpu") else "32-true"
    assert trainer.precision == expected
    assert f"trainer.precision auto -> {expected}" in caplog.text


@pytest.mark.parametrize("recipe", ["demo.yaml", "shellworld-sft.yaml"])
def test_recipes_say_auto_and_parse(recipe, capsys):
    assert yaml.safe_load((REPO / "configs" / recipe).read_text())["trainer"]["precision"] == "auto"
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs" / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["precision"] == "auto"
