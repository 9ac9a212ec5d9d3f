"""EchoModule in a plain Lightning Trainer: Trainer options it replaces fail with its own names; epochs work."""

from pathlib import Path

import lightning as L
import pytest

from lit_echo import EchoModule, RolloutDataModule
from lit_echo.module import TrainerSettingError

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "data/sample/train.jsonl")


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("setting, points_to", [({"accumulate_grad_batches": 2}, "model.micro_batch_size"),
                                                ({"gradient_clip_val": 0.5}, "model.gradient_clip_val")])
def test_trainer_options_replaced_by_the_module_name_the_module_option(tiny_checkpoint, setting, points_to):
    # Lightning's own check would say "not supported for manual optimization" without naming the module's option.
    module = EchoModule(str(tiny_checkpoint), lora_rank=4)
    data = RolloutDataModule(TRAIN, tokenizer=str(tiny_checkpoint), batch_size=4, max_length=128)
    with pytest.raises(TrainerSettingError, match=points_to):
        _trainer(max_steps=1, **setting).fit(module, data)


def test_a_finite_offline_buffer_trains_by_epochs(tiny_checkpoint):
    """repeat: false makes each epoch one pass over the buffer, so max_epochs ends the fit (no max_steps)."""
    def data():
        return RolloutDataModule(TRAIN, tokenizer=str(tiny_checkpoint), batch_size=100, max_length=160, repeat=False)

    per_epoch = len(list(data().train_dataloader()))
    assert per_epoch == 2  # 200 rollouts in batches of 100
    trainer = _trainer(max_epochs=2)
    trainer.fit(EchoModule(str(tiny_checkpoint), lora_rank=4), data())
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * per_epoch
