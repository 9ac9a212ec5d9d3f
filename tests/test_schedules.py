"""world_coef schedules (lit_echo.schedules), PaW reward-adaptive weights and entropy-based transition selection
(lit_echo.paw)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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


def _random_step(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Roles of ``rows`` sequences of context, then turns of action and observation spans, and random entropies."""
    gen = torch.Generator().manual_seed(seed)
    roles = torch.full((rows, width), C)
    for i in range(rows):
        t = int(torch.randint(1, 4, (1,), generator=gen))
        while t < width:
            for role in (A, O if torch.rand(1, generator=gen) < 0.8 else W):
                span = int(torch.randint(1, 5, (1,), generator=gen))
                roles[i, t:t + span] = role
                t += span
    return roles, 3 * torch.rand(rows, width, generator=gen)


SELECT_ACROSS_RANKS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path.insert(0, sys.argv[1])
    from test_schedules import _random_step
    from lit_echo.paw import select_transitions_by_entropy, transition_ids_from_roles

    def rank_rows(rank, world):  # rank 2 of 3 gets rows without any observation: it has no candidate
        return [1, 3, 5, 7, 9] if rank == 0 else [0, 2, 4, 6, 8] if rank == 1 else [10, 11]

    def run(rank, world, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        roles, entropy = _random_step(12, 40, seed=3)
        roles[10:] = 0
        rows = rank_rows(rank, world)
        ids = transition_ids_from_roles(roles[rows])
        for across in (True, False):
            mask = select_transitions_by_entropy(entropy[rows], roles[rows], ids, fraction=0.75, across_ranks=across)
            torch.save(mask, f"{out}/rank{rank}-{across}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(3, "file://" + sys.argv[2] + "/store", sys.argv[2]), nprocs=3)
""")


def test_selection_across_ranks_keeps_what_one_process_keeps(tmp_path):
    """Three gloo ranks with interleaved rows (one without candidates) select exactly the transitions one process
    selects from all the rows; ranking each rank's rows alone (the old behaviour) selects others."""
    script = tmp_path / "ranks_select.py"
    script.write_text(SELECT_ACROSS_RANKS)
    subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(tmp_path)], check=True,
                   timeout=120)
    roles, entropy = _random_step(12, 40, seed=3)
    roles[10:] = C
    whole = select_transitions_by_entropy(entropy, roles, transition_ids_from_roles(roles), fraction=0.75)
    assert 0 < whole.sum() < ((roles == O) | (roles == W)).sum()  # some transitions dropped
    per_rank_differs = False
    for rank, rows in enumerate(([1, 3, 5, 7, 9], [0, 2, 4, 6, 8], [10, 11])):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}-True.pt"), whole[rows]), rank
        per_rank_differs |= not torch.equal(torch.load(tmp_path / f"rank{rank}-False.pt"), whole[rows])
    assert per_rank_differs


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
