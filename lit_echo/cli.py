"""The ``lit-echo`` command: LightningCLI over :class:`EchoModule` and :class:`RolloutDataModule`.

    lit-echo fit --config configs/tiny.yaml
    lit-echo fit --config configs/demo.yaml --model.world_coef 0     # action-masking baseline
    lit-echo fit --config configs/tiny.yaml --print_config
"""

from __future__ import annotations

import logging
from typing import Literal

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

from lit_echo.data.datamodule import RolloutDataModule
from lit_echo.module import EchoModule
from lit_echo.precision import accelerator_device_type, resolve_precision

log = logging.getLogger(__name__)


class AutoPrecisionTrainer(Trainer):
    """Lightning's Trainer with one more ``precision`` value, ``"auto"``: bf16-mixed where the hardware computes
    bf16 natively, else 32-true on CPU (16-mixed on a CUDA GPU); see :mod:`lit_echo.precision`."""

    def __init__(self, precision: Literal["auto"] | _PRECISION_INPUT | None = None, **kwargs):
        if precision == "auto":
            precision, reason = resolve_precision(precision, accelerator_device_type(kwargs.get("accelerator", "auto")))
            log.info("trainer.precision auto -> %s (%s)", precision, reason)
        super().__init__(precision=precision, **kwargs)


class EchoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module renders messages records with the model's own tokenizer and chat template.
        parser.link_arguments("model.model_name_or_path", "data.init_args.tokenizer")


def run(args: list[str] | None = None) -> EchoCLI:
    """Build and run the CLI (returns it, for tests and notebooks)."""
    # subclass_mode_data: the offline RolloutDataModule or a subclass (e.g. the online one) picked by class_path.
    return EchoCLI(EchoModule, RolloutDataModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                   args=args, auto_configure_optimizers=False, trainer_class=AutoPrecisionTrainer)


def main() -> None:
    """Console-script entry point (``lit-echo``): exit status 0 on success."""
    run()


if __name__ == "__main__":
    main()
