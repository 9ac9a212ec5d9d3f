"""world_coef schedules (lit_echo.schedules), PaW reward-adaptive weights and entropy-based transition selection
(lit_echo.paw)."""

from __future__ import annotations

import pytest
import torch

from lit_echo.paw import (
    group_world_weights,
    reward_adaptive_world_weights,
    select_transitions_by_entropy,
    transition_ids_from_roles,
)
from lit_echo.roles import Role
from lit_echo.schedules import WorldCoefSchedule, linear_decay_coef, step_decay_coef

C, A, O, W = int(Role.CONTEXT), int(Role.ACTION), int(Role.OBSERVATION), int(Role.WARNING)


def test_constant_linear_and_step_schedules():
    assert [WorldCoefSchedule()(s) for s in (0, 10**6)] == [0.05, 0.05]
    linear = WorldCoefSchedule(kind="linear", world_coef=0.1, final_coef=0.02, decay_steps=100)
    assert [linear(s) for s in (0, 50, 100, 500)] == pytest.approx([0.1, 0.06, 0.02, 0.02])
    step = WorldCoefSchedule(kind="step", world_coef=0.08, gamma=0.5, step_size=10, final_coef=0.015)
    assert [step(s) for s in (0, 9, 10, 25, 100)] == pytest.approx([0.08, 0.08, 0.04, 0.02, 0.015])
    assert linear_decay_coef(25, world_coef=1.0, final_coef=0.0, decay_steps=100) == 0.75
    assert step_decay_coef(30, world_coef=1.0, gamma=0.1, step_size=10) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="kind"):
        WorldCoefSchedule(kind="cosine")
    with pytest.raises(ValueError, match="world_coef"):
        WorldCoefSchedule(world_coef=-0.05)
    with pytest.raises(ValueError, match="world_gamma"):
        WorldCoefSchedule(kind="step", gamma=0.0)


def test_reward_adaptive_weight_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 10.0, 10.0, 5.0])
    groups = torch.tensor([7, 7, 3, 3, 9, 9, 9])
    weights = reward_adaptive_world_weights(rewards, groups, max_reward=10.0)
    mean_7, mean_3, mean_9 = 0.5, 0.0, 25.0 / 3
    expected = [1 - mean_7 / 10] * 2 + [1 - mean_3 / 10] * 2 + [1 - mean_9 / 10] * 3
    torch.testing.assert_close(weights, torch.tensor(expected))
    with pytest.raises(ValueError, match="R_max"):
        reward_adaptive_world_weights(rewards, groups, max_reward=0.0)


def test_group_world_weights_use_the_whole_group_mean():
    """A shuffled offline batch holds part of a group: the weight must come from the whole group's mean."""
    partial_rows_rewards = torch.tensor([1.0, 1.0])  # two successes of a group of 8 with mean 0.25
    in_batch = reward_adaptive_world_weights(partial_rows_rewards, torch.tensor([0, 0]), max_reward=1.0)
    whole = group_world_weights(torch.tensor([0.25, 0.25]), max_reward=1.0)
    assert in_batch.tolist() == [0.0, 0.0] and whole.tolist() == [0.75, 0.75]
    with pytest.raises(ValueError, match="R_max"):
        group_world_weights(torch.tensor([0.5]), max_reward=-1.0)


def test_transition_ids_from_roles():
    roles = torch.tensor([[C, C, A, A, C, O, O, A, C, W, O, A, A]])
    assert transition_ids_from_roles(roles).tolist() == [[-1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]]


def test_selection_picks_top_fraction_of_transitions():
    # Two sequences, three transitions each with observations; action entropies are the scores.
    roles = torch.tensor([[A, A, O, O, A, O, W, A, O],
                          [A, O, O, A, A, O, A, O, C]])
    entropy = torch.tensor([[1.0, 3.0, 9.0, 9.0, 0.5, 9.0, 9.0, 4.0, 9.0],   # means 2.0, 0.5, 4.0
                            [3.5, 0.0, 0.0, 1.0, 2.0, 0.0, 0.1, 0.0, 0.0]])  # means 3.5, 1.5, 0.1
    ids = transition_ids_from_roles(roles)
    mask = select_transitions_by_entropy(entropy, roles, ids, fraction=0.75)  # ceil(0.75 * 6) = 5: drop 0.1
    world = (roles == O) | (roles == W)
    dropped = (ids == 2) & (torch.arange(2)[:, None] == 1)
    assert torch.equal(mask, world & ~dropped)
    top_two = select_transitions_by_entropy(entropy, roles, ids, fraction=2 / 6)  # 4.0 and 3.5
    keep = ((ids == 2) & (torch.arange(2)[:, None] == 0)) | ((ids == 0) & (torch.arange(2)[:, None] == 1))
    assert torch.equal(top_two, world & keep)
    assert not select_transitions_by_entropy(entropy, roles, ids, fraction=0.0).any()


def test_selection_per_sequence_and_without_actions():
    roles = torch.tensor([[A, O], [A, O], [C, O], [A, A]])  # row 2 has no action, row 3 no observation
    entropy = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    mask = select_transitions_by_entropy(entropy, roles, fraction=0.5)  # 3 candidates -> keep 2
    assert mask.tolist() == [[False, True], [False, True], [False, False], [False, False]]
    assert select_transitions_by_entropy(entropy, roles, fraction=1.0)[2, 1]  # scored last, still kept at 1.0


def test_entropy_guard_factor_follows_the_smoothed_rise():
    from lit_echo.entropy_guard import EntropyGuard

    guard = EntropyGuard(max_rise=0.1, reference_steps=2, smoothing=0.5)
    assert guard.factor() == 1.0 and guard.rise is None
    guard.update(0.30)
    assert guard.factor() == 1.0 and guard.reference is None  # no reference yet: untouched
    guard.update(0.50)
    assert guard.reference == pytest.approx(0.40) and guard.smoothed == pytest.approx(0.40)
    assert guard.factor() == 1.0
    guard.update(0.48)  # smoothed 0.44: a rise of exactly 10% -> still 1
    assert guard.rise == pytest.approx(0.10) and guard.factor() == pytest.approx(1.0)
    guard.update(0.52)  # smoothed 0.48: +20% -> 0
    assert guard.rise == pytest.approx(0.20) and guard.factor() == pytest.approx(0.0)
    guard.update(0.40)  # smoothed 0.44 -> back to 1
    assert guard.factor() == pytest.approx(1.0)
    guard.update(0.48)  # smoothed 0.46: +15% -> halfway
    assert guard.factor() == pytest.approx(0.5)
    guard.update(float("nan"))  # a step without a number changes nothing
    assert guard.factor() == pytest.approx(0.5)
    copy = EntropyGuard(max_rise=0.1, reference_steps=2, smoothing=0.5)
    copy.load_state_dict(guard.state_dict())
    assert copy.state_dict() == guard.state_dict() and copy.factor() == guard.factor()
    falling = EntropyGuard(max_rise=0.1, reference_steps=1, smoothing=0.0)
    falling.update(0.4)
    falling.update(0.1)  # entropy falling never shrinks the world term
    assert falling.factor() == 1.0


def test_entropy_guard_rejects_bad_settings():
    from lit_echo.entropy_guard import EntropyGuard

    with pytest.raises(ValueError, match="world_entropy_guard: expected a relative rise > 0"):
        EntropyGuard(max_rise=0.0)
    with pytest.raises(ValueError, match="world_entropy_guard_steps"):
        EntropyGuard(max_rise=0.1, reference_steps=0)
    with pytest.raises(ValueError, match="world_entropy_guard_smoothing"):
        EntropyGuard(max_rise=0.1, smoothing=1.0)
