import logging
import math

import pytest
import torch

from lit_echo import Role, Rollout
from lit_echo.data.buffer import BufferItem
from lit_echo.data.collate import RolloutCollator, pad_token_id
from lit_echo.tiny import build_tiny_tokenizer


def _r(n, adv=None, logprobs=True, reward=0.0):
    roles = [Role.CONTEXT, Role.CONTEXT] + [Role.ACTION, Role.OBSERVATION] * ((n - 2) // 2) + [Role.WARNING] * (n % 2)
    lps = [None if r != Role.ACTION else -0.5 for r in roles] if logprobs else None
    return Rollout(input_ids=list(range(10, 10 + n)), roles=[int(r) for r in roles], logprobs=lps,
                   advantage=adv, reward=reward, group_id=f"g{n}", policy_version=n)


def test_right_padding_masks_and_nan_logprobs():
    batch = RolloutCollator(pad_token_id=0)([BufferItem(_r(6, 1.5), 2), _r(3, None, logprobs=False, reward=1.0)])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15], [10, 11, 12, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["roles"].tolist() == [[0, 0, 1, 2, 1, 2], [0, 0, 3, 0, 0, 0]]
    lp = batch["old_logprobs"]
    assert lp[0, 2].item() == -0.5 and lp[0, 4].item() == -0.5
    assert math.isnan(lp[0, 0].item()) and torch.isnan(lp[1]).all()
    assert batch["advantages"].tolist() == [1.5, 0.0] and batch["rewards"].tolist() == [0.0, 1.0]
    assert batch["policy_version"].tolist() == [6, 3] and batch["group_ids"] == ["g6", "g3"]
    assert batch["num_skipped"] == 2 and batch["num_truncated"] == 0


def test_right_truncation_keeps_prefix_and_counts():
    batch = RolloutCollator(0, max_length=4)([_r(6), _r(3), _r(8)])
    assert batch["input_ids"].shape == (3, 4) and batch["num_truncated"] == 2
    assert batch["input_ids"][2].tolist() == [10, 11, 12, 13]
    assert batch["roles"][0].tolist() == [0, 0, 1, 2]


def test_drop_policy():
    batch = RolloutCollator(0, max_length=4, truncation="drop")([_r(6), _r(3), _r(4)])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0], [10, 11, 12, 13]] and batch["num_truncated"] == 1
    only_long = RolloutCollator(0, max_length=4, truncation="drop")([_r(6), _r(8)])
    assert only_long["input_ids"].tolist() == [[10, 11, 12, 13]] and only_long["num_truncated"] == 2


def test_bad_settings():
    with pytest.raises(ValueError, match="truncation"):
        RolloutCollator(0, truncation="left")
    with pytest.raises(ValueError, match="max_length"):
        RolloutCollator(0, max_length=1)


def test_constant_advantage_overrides_for_sft():
    batch = RolloutCollator(0, advantage=1.0)([_r(4, adv=-2.0), _r(4, adv=None)])
    assert batch["advantages"].tolist() == [1.0, 1.0]


def test_group_reward_mean_from_the_buffer_or_the_batch_rows():
    a = [Rollout(input_ids=[1, 2], roles=[0, 1], reward=float(k), group_id="a") for k in range(3)]  # mean 1
    b = Rollout(input_ids=[1, 2], roles=[0, 1], reward=5.0, group_id="b")
    loose = [Rollout(input_ids=[1, 2], roles=[0, 1], reward=float(k), group_id="") for k in (7, 9)]
    batch = RolloutCollator(0)([a[0], b, a[2], a[1], *loose])  # online: whole groups in the batch
    assert batch["group_reward_mean"].tolist() == [1.0, 5.0, 1.0, 1.0, 7.0, 9.0]
    assert batch["group_reward_mean"].dtype == torch.float32
    # From the buffer: the whole group's mean, whatever rows of it the batch holds.
    batch = RolloutCollator(0)([BufferItem(a[0], group_reward_mean=4.0), BufferItem(b, group_reward_mean=5.0)])
    assert batch["group_reward_mean"].tolist() == [4.0, 5.0]
    dropped = RolloutCollator(0, max_length=4, truncation="drop")([BufferItem(_r(6), group_reward_mean=2.0),
                                                                    BufferItem(_r(3), group_reward_mean=3.0)])
    assert dropped["group_reward_mean"].tolist() == [3.0]


def test_max_length_below_every_prompt_is_an_error_then_a_warning(caplog):
    """Was silent: every step logged a loss of 0.0 and trained nothing."""
    long_prompt = Rollout(input_ids=list(range(10)), roles=[0] * 6 + [1, 1, 2, 2])  # first target at 6
    collate = RolloutCollator(0, max_length=6)
    with pytest.raises(ValueError, match=r"data.max_length=6 .* shortest prompt here is 6 tokens"):
        collate([long_prompt, long_prompt])
    with caplog.at_level(logging.WARNING):
        collate([long_prompt])  # later batches: a warning, the run goes on
    assert "data.max_length=6" in caplog.text
    fine = RolloutCollator(0, max_length=7)([long_prompt])  # one target (position 6) survives
    assert fine["roles"][0].tolist() == [0] * 6 + [1]


def test_pad_token_id_fallbacks(tiny_tokenizer):
    assert pad_token_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
    assert pad_token_id(None) == 0
    eos_only = build_tiny_tokenizer()
    eos_only.pad_token = None
    assert pad_token_id(eos_only) == eos_only.eos_token_id == 2
