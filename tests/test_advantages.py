import math

import pytest

from lit_echo.advantages import group_mean_rewards, grpo_advantages


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


def test_huge_and_non_finite_rewards():
    """1e200 once overflowed (inf std -> zero advantages; NaN at 1e308); NaN gave NaN advantages silently."""
    assert grpo_advantages([1e200, -1e200, 0.0], ["g"] * 3) == pytest.approx([1.0, -1.0, 0.0])
    assert grpo_advantages([1.7e308, -1.7e308], ["g"] * 2) == pytest.approx([2 ** -0.5, -(2 ** -0.5)])
    assert grpo_advantages([3e38, 0.0], ["g", "g"], scale_by_std=False) == [1.5e38, -1.5e38]
    assert group_mean_rewards([1.7e308, 1.7e308, 1.0], ["g", "g", "h"]) == [1.7e308, 1.7e308, 1.0]
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="group 'task-3': the reward of row 1 is .* not a finite number"):
            grpo_advantages([0.0, bad, 1.0], ["task-2", "task-3", "task-3"])


def test_scaling_is_exact_for_ordinary_rewards():
    rewards = [0.1, 0.7, 0.3, 1.0, 0.0]
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    assert grpo_advantages(rewards, ["g"] * n) == [(r - mean) / (std + 1e-6) for r in rewards]
    assert grpo_advantages(rewards, ["g"] * n, scale_by_std=False) == [r - mean for r in rewards]
    assert group_mean_rewards(rewards, ["g"] * n) == [mean] * n
