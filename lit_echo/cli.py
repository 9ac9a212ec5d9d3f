"""The ``lit-echo`` command: LightningCLI over :class:`EchoModule` and :class:`RolloutDataModule`, plus two tools.

    lit-echo fit --config configs/tiny.yaml
    lit-echo fit --config configs/demo.yaml --model.world_coef 0     # action-masking baseline
    lit-echo fit --config configs/tiny.yaml --print_config
    lit-echo fit --help                                              # every --model.* option, described
    lit-echo fit --data.help lit_echo.online.OnlineRolloutDataModule # the --data.* options of a data module
    lit-echo validate --config configs/tiny.yaml --ckpt_path CKPT    # held-out world model (val/*)
    lit-echo evaluate --adapter runs/demo/adapter ...                # held-out agent + world metrics (evaluate.py)
    lit-echo export --model smollm2-135m-instruct --adapter DIR --out DIR   # merged full model

A mistake in the configuration or the input files (an option out of range, a missing path, an environment that
cannot be built, a bad record) ends the command with one line naming it and exit status 2; set
``LIT_ECHO_TRACEBACK=1`` for the traceback. Class paths may name modules in the working directory
(``--data.init_args.env_class my_env.MyEnv`` with ``my_env.py`` there), as under ``python -m``.

``test`` and ``predict`` are not offered: ``validate`` is the world-model evaluation on a held-out buffer and
``evaluate`` plays the policy in an environment, which is what they would do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Literal

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

from lit_echo.data.datamodule import RolloutDataModule
from lit_echo.module import EchoModule, TrainerSettingError, check_trainer_settings
from lit_echo.precision import accelerator_device_type, resolve_precision
from lit_echo.user_errors import report_user_errors

log = logging.getLogger(__name__)


class AutoPrecisionTrainer(Trainer):
    """Lightning's Trainer with one more ``precision`` value, ``"auto"``: bf16-mixed where the hardware computes
    bf16 natively, else 32-true on CPU (16-mixed on a CUDA GPU); see :mod:`lit_echo.precision`."""

    def __init__(self, precision: Literal["auto"] | _PRECISION_INPUT | None = None, **kwargs):
        if precision == "auto":
            precision, reason = resolve_precision(precision, accelerator_device_type(kwargs.get("accelerator", "auto")))
            log.info("trainer.precision auto -> %s (%s)", precision, reason)
        super().__init__(precision=precision, **kwargs)

TOOLS = {"evaluate": "held-out evaluation: agent success in an environment, world NLL on a buffer",
         "export": "merge a LoRA adapter into its base model: a full checkpoint for AutoModelForCausalLM"}
DESCRIPTION = ("ECHO/PaW agent RL with Lightning. Also: " + "; ".join(f"`lit-echo {name} --help`: {what}"
                                                                    for name, what in TOOLS.items()) + ".")


class EchoCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        # The data module renders messages records with the model's own tokenizer and chat template.
        parser.link_arguments("model.model_name_or_path", "data.init_args.tokenizer")

    def before_instantiate_classes(self) -> None:
        # Before the model loads: Trainer options that EchoModule's manual optimization replaces.
        if self.subcommand != "fit":
            return
        trainer = self.config[self.subcommand].trainer
        try:
            check_trainer_settings(trainer.accumulate_grad_batches, trainer.gradient_clip_val)
        except TrainerSettingError as err:
            self.parser.error(str(err))


def show_package_logs(level: int = logging.INFO) -> None:
    """Print the ``lit_echo`` loggers' records (parameter summary, generation progress) to stderr.

    Only when neither the package logger nor the root logger has a handler, so an application's own logging
    configuration is left alone.
    """
    package = logging.getLogger("lit_echo")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    package.addHandler(handler)
    package.setLevel(level)


def run(args: list[str] | None = None) -> EchoCLI:
    """Build and run the LightningCLI (returns it, for tests and notebooks)."""
    show_package_logs()
    # subclass_mode_data: the offline RolloutDataModule or a subclass (e.g. the online one) picked by class_path.
    return EchoCLI(EchoModule, RolloutDataModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                   args=args, auto_configure_optimizers=False, trainer_class=AutoPrecisionTrainer,
                   parser_kwargs={"description": DESCRIPTION})


def export(argv: list[str] | None = None) -> None:
    """``lit-echo export``: base model + LoRA adapter -> one merged checkpoint (tokenizer included)."""
    parser = argparse.ArgumentParser(prog="lit-echo export", description=TOOLS["export"])
    parser.add_argument("--model", required=True,
                        help="base model the adapter was trained on: built-in name, local directory or hub id")
    parser.add_argument("--adapter", required=True, help="LoRA adapter directory (peft format, e.g. AdapterExport)")
    parser.add_argument("--out", required=True, help="directory for the merged model (save_pretrained format)")
    args = parser.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_echo import models
    from lit_echo.pretrained import load_tokenizer

    adapter = models.check_adapter_dir(args.adapter, option="--adapter")
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(args.model))
    models.export_merged(PeftModel.from_pretrained(base, str(adapter)), args.out, tokenizer=load_tokenizer(args.model))
    print(f"wrote {args.out}")


def _search_working_directory() -> None:
    """Let class paths name modules in the working directory, as ``python -m`` does; appended after the installed
    packages, so a local folder never shadows one."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``lit-echo``): the LightningCLI subcommands, or one of the TOOLS. A mistake in
    the configuration or the files is one line and exit status 2 (:mod:`lit_echo.user_errors`)."""
    _search_working_directory()
    with report_user_errors("lit-echo"):
        _dispatch(argv)


def _dispatch(argv: list[str] | None) -> None:
    tool = (sys.argv[1:] if argv is None else argv)[:1]
    rest = (sys.argv[2:] if argv is None else argv[1:])
    if tool == ["evaluate"]:
        from lit_echo.evaluate import main as evaluate

        show_package_logs()
        evaluate(rest, prog="lit-echo evaluate")
    elif tool == ["export"]:
        export(rest)
    else:
        run(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
