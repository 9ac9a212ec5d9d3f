import math

import pytest

from lit_echo.advantages import grpo_advantages


def test_grpo_against_hand_computation():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 2.0, 0.0]
    groups = ["a", "a", "a", "a", "b", "b", "c"]
    adv = grpo_advantages(rewards, groups)
    # group a: mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.57735
    std_a = math.sqrt(1.0 / 3.0)
    assert adv[:4] == pytest.approx([0.5 / (std_a + 1e-6), -0.5 / (std_a + 1e-6)] * 1 + [-0.5 / (std_a + 1e-6),
                                                                                         0.5 / (std_a + 1e-6)])
    # group b: mean 1.25, std sqrt((0.5625 * 2) / 1) = 1.06066
    std_b = math.sqrt(1.125)
    assert adv[4:6] == pytest.approx([-0.75 / (std_b + 1e-6), 0.75 / (std_b + 1e-6)])
    assert adv[6] == 0.0  # group of one


def test_dr_grpo_and_equal_rewards():
    assert grpo_advantages([1.0, 3.0], ["g", "g"], scale_by_std=False) == [-1.0, 1.0]
    assert grpo_advantages([1.0, 1.0, 1.0], ["g"] * 3) == [0.0, 0.0, 0.0]


def test_length_mismatch():
    with pytest.raises(ValueError):
        grpo_advantages([1.0], ["a", "b"])
