"""The batched multi-turn generator with a real tiny model, a real tokenizer and chat template, real environments.

The reference path (``kv_cache=False``) is checked against what HF ``generate`` itself returned (recorded by
wrapping the model's ``generate``); the KV-cache path against the reference path under the same seed (same ids,
same log-probs); the log-probs of both against a fresh forward pass; the roles against what the environment saw
and said.
"""

from __future__ import annotations

import time

import pytest
import torch
from envs_for_tests import ScriptedEnv, lora_policy

from lit_echo import models
from lit_echo.chat import RolloutBuilder, role_spans_text
from lit_echo.envs.base import StepResult
from lit_echo.envs.shellworld import ShellWorld
from lit_echo.logprobs import chunked_logprobs
from lit_echo.online.decoding import CachedRows, _common_prefix, length_buckets
from lit_echo.online.generator import GroupGenerator, SamplingSettings, truncate_observation
from lit_echo.roles import Role

END = "<|im_end|>"


class FailingEnv(ScriptedEnv):
    """Pays a reward on turn 1, then breaks on turn 2: by raising, or by hanging (60 s) past the time limit."""

    def __init__(self, mode: str = "raise"):
        super().__init__()
        self.mode = mode

    def step(self, action: str) -> StepResult:
        if self.turn == 1:
            if self.mode == "raise":
                raise ValueError("boom")
            time.sleep(60)
        return super().step(action)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return lora_policy(tiny_checkpoint)


class GenerateSpy:
    """Records ``(prompt width, sequences)`` of every ``model.generate`` call (HF's own output)."""

    def __init__(self, model, monkeypatch):
        self.calls: list[tuple[int, torch.Tensor]] = []
        original = model.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.append((kwargs["input_ids"].shape[1], out.sequences.clone()))
            return out

        monkeypatch.setattr(model, "generate", generate)


class UnevenEnv(ScriptedEnv):
    """Rollouts of one group end at different turns (decided by the sampled text) and get observations of
    different lengths, so rows leave the KV cache at different times and every chunk is padded."""

    def step(self, action: str) -> StepResult:
        result = super().step(action)
        text = result.observation + "y" * (len(action) % 7)
        self.observations[-1] = text
        return StepResult(text, reward=len(action) % 3, done=self.turn == 4 or len(action) % 3 == 0,
                          info=result.info)


def _envs(generator):
    return generator._envs


def _assert_logprobs_match_a_fresh_forward(model, rollouts, temperature):
    """Stored sampling log-probs == a fresh forward pass at the sampling temperature (ACTION targets)."""
    model.eval()
    for rollout in rollouts:
        ids = torch.tensor([rollout.input_ids])
        roles = torch.tensor([rollout.roles])[:, 1:]
        with torch.no_grad():
            hidden = models.hidden_states(model, ids, torch.ones_like(ids))[:, :-1]
            logp = chunked_logprobs(hidden, models.output_head(model), ids[:, 1:], temperature=temperature,
                                    temperature_mask=roles == Role.ACTION)[0]
        stored = [(t, lp) for t, lp in enumerate(rollout.logprobs) if lp is not None]
        assert stored and all(rollout.roles[t] == Role.ACTION for t, _ in stored)
        positions = torch.tensor([t - 1 for t, _ in stored])
        torch.testing.assert_close(logp[positions], torch.tensor([lp for _, lp in stored]), atol=2e-4, rtol=0)


def test_actions_are_the_sampled_ids_with_their_logprobs(model, tokenizer, monkeypatch):
    spy = GenerateSpy(model, monkeypatch)
    settings = SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=12, max_turns=3, kv_cache=False)
    generator = GroupGenerator(ScriptedEnv, tokenizer, settings)
    model.train()
    torch.manual_seed(1)
    rollouts, stats = generator.generate_group(model, seed=7, group_size=3, policy_version=4)
    assert model.training, "train mode must be restored after generation"
    assert len(rollouts) == 3 and len(spy.calls) == 3  # every rollout runs all 3 turns, so 3 batched calls
    end = tokenizer.convert_tokens_to_ids(END)

    for i, rollout in enumerate(rollouts):
        # What generate returned for row i of each turn, cut after the end-of-turn token.
        expected: list[int] = []
        for width, sequences in spy.calls:
            ids = sequences[i, width:].tolist()
            expected += ids[: ids.index(end) + 1] if end in ids else ids
        action = [t for t, r in zip(rollout.input_ids, rollout.roles) if r == Role.ACTION]
        assert action == expected
        assert rollout.policy_version == 4 and rollout.group_id == "seed-7"
        assert rollout.metadata["turns"] == 3 and rollout.metadata["env_seed"] == 7
        assert rollout.metadata["invalid_actions"] == 1 and rollout.reward == pytest.approx(1.5)
    assert stats.rollouts == 3 and stats.turns == 9 and stats.invalid_actions == 3

    _assert_logprobs_match_a_fresh_forward(model, rollouts, 0.7)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 1.0)])
def test_kv_cache_path_samples_what_the_generate_path_samples(model, tokenizer, temperature, top_p):
    """Same seed, same ids and log-probs: the cached path prefills less but computes the same distribution and
    draws from the random stream exactly as HF generate does."""
    results = {}
    for kv_cache in (False, True):
        settings = SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=10, max_turns=4,
                                    kv_cache=kv_cache)
        generator = GroupGenerator(UnevenEnv, tokenizer, settings)
        torch.manual_seed(3)
        results[kv_cache] = generator.generate_group(model, seed=11, group_size=5)
        results[kv_cache] += (torch.rand(1),)  # the random stream after generation
    (reference, reference_stats, reference_next), (cached, cached_stats, cached_next) = results[False], results[True]
    assert len({r.metadata["turns"] for r in cached}) > 1, "rows should leave the cache at different turns"
    for a, b in zip(reference, cached):
        assert a.input_ids == b.input_ids and a.roles == b.roles
        assert a.metadata == b.metadata and a.reward == b.reward
        assert [lp is None for lp in a.logprobs] == [lp is None for lp in b.logprobs]
        torch.testing.assert_close(torch.tensor([lp for lp in b.logprobs if lp is not None]),
                                   torch.tensor([lp for lp in a.logprobs if lp is not None]), atol=1e-5, rtol=0)
    assert torch.equal(reference_next, cached_next)
    assert cached_stats.sampled_tokens == reference_stats.sampled_tokens
    assert cached_stats.prefill_tokens < reference_stats.prefill_tokens
    _assert_logprobs_match_a_fresh_forward(model, cached, temperature)


def test_several_tasks_in_one_batch(model, tokenizer):
    """generate_groups: each task's rows come back as its own group (its seed, its opening, its group id), the
    roles decode to what the environment saw and said, the cached and the generate path draw the same ids from
    rows of different openings, and stored log-probs equal a fresh forward."""
    results = {}
    for kv_cache in (False, True):
        generator = GroupGenerator(UnevenEnv, tokenizer, SamplingSettings(temperature=0.9, max_new_tokens=8,
                                                                           max_turns=4, kv_cache=kv_cache))
        torch.manual_seed(5)
        results[kv_cache] = generator.generate_groups(model, [7, 12, 30], 2, group_ids=["a", "b", "c"])
    (reference, _), (groups, stats) = results[False], results[True]
    assert [len(g) for g in groups] == [2, 2, 2] and stats.rollouts == 6
    envs = iter(_envs(generator))  # row order: the G instances of the first task, then of the second, ...
    for group, seed, group_id, reference_group in zip(groups, [7, 12, 30], "abc", reference):
        for rollout, expected in zip(group, reference_group):
            env = next(envs)
            assert rollout.group_id == group_id and rollout.metadata["env_seed"] == seed
            assert f"Task {seed}:" in rollout.metadata["task"]
            assert rollout.input_ids == expected.input_ids and rollout.roles == expected.roles
            spans = role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
            assert f"Task {seed}: say anything." in "".join(text for role, text in spans if role == Role.CONTEXT)
            assert [text for role, text in spans if role == Role.OBSERVATION] == env.observations
            actions = [text for role, text in spans if role == Role.ACTION]
            assert len(actions) == len(env.actions) >= 1
            for text, action in zip(actions, env.actions):
                assert text in (action, action + END)
    _assert_logprobs_match_a_fresh_forward(model, [r for g in groups for r in g], 0.9)
    with pytest.raises(ValueError, match="group_ids"):
        generator.generate_groups(model, [1, 2], 2, group_ids=["x"])


def test_rows_of_uneven_chunks_prefilled_in_buckets_sample_the_same(model, tokenizer, monkeypatch):
    """Extra forwards free (split_cost 0): each turn's chunks go through several forwards of similar length and
    are merged back into one cache; the ids and log-probs stay those of the generate path, with fewer prefilled
    positions than one padded forward."""
    def run(kv_cache: bool):
        generator = GroupGenerator(UnevenEnv, tokenizer, SamplingSettings(temperature=0.7, max_new_tokens=10,
                                                                          max_turns=4, kv_cache=kv_cache))
        torch.manual_seed(3)
        return generator.generate_groups(model, [11, 4], 3)

    reference, _ = run(False)
    _, padded = run(True)
    monkeypatch.setattr(CachedRows, "split_cost", 0)
    groups, bucketed = run(True)
    assert bucketed.prefill_tokens < padded.prefill_tokens, "the chunks should have been split"
    for group, reference_group in zip(groups, reference):
        for a, b in zip(reference_group, group):
            assert a.input_ids == b.input_ids and a.roles == b.roles and a.reward == b.reward
            torch.testing.assert_close(torch.tensor([lp for lp in b.logprobs if lp is not None]),
                                       torch.tensor([lp for lp in a.logprobs if lp is not None]), atol=1e-5, rtol=0)
    _assert_logprobs_match_a_fresh_forward(model, [r for g in groups for r in g], 0.7)


@pytest.mark.parametrize("lengths", [[5], [3, 3, 3], [1, 50, 2, 49, 3], [7, 1, 1, 1, 1, 1, 1, 30], list(range(1, 9))])
@pytest.mark.parametrize("split_cost", [0, 4, 1000])
def test_length_buckets_are_an_optimal_partition(lengths, split_cost):
    """Every row in exactly one bucket, each bucket as wide as its longest row, and no grouping of the rows costs
    fewer positions (brute force over all set partitions)."""
    buckets = length_buckets(lengths, split_cost)
    assert sorted(i for rows, _ in buckets for i in rows) == list(range(len(lengths)))
    assert all(width == max(lengths[i] for i in rows) for rows, width in buckets)

    def cost(groups):
        return sum(len(g) * max(lengths[i] for i in g) for g in groups) + split_cost * (len(groups) - 1)

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for partition in partitions(rest):
            yield [[first], *partition]
            for k in range(len(partition)):
                yield [*partition[:k], [first, *partition[k]], *partition[k + 1:]]

    assert cost([rows for rows, _ in buckets]) == min(cost(p) for p in partitions(list(range(len(lengths)))))


def test_the_shared_opening_is_prefilled_once(model, tokenizer):
    """Turn 1 of the cached path: each distinct opening once, its cache repeated to its G rows (several tasks:
    the system prompt they share once more, then each task's own rest); the reference path prefills the whole
    opening for every row."""
    openings = [len(RolloutBuilder(tokenizer, ScriptedEnv().reset(seed)).prompt_ids()) for seed in (0, 1)]
    shared = _common_prefix([RolloutBuilder(tokenizer, ScriptedEnv().reset(seed)).prompt_ids() for seed in (0, 1)])
    counts = {}
    for kv_cache in (True, False):
        generator = GroupGenerator(ScriptedEnv, tokenizer, SamplingSettings(max_new_tokens=4, max_turns=1,
                                                                            kv_cache=kv_cache))
        counts[kv_cache] = generator.generate_group(model, seed=0, group_size=3)[1].prefill_tokens
        counts[kv_cache, 2] = generator.generate_groups(model, [0, 1], 3)[1].prefill_tokens
    assert counts[True] == openings[0] and counts[False] == 3 * openings[0]
    rest = max(openings) - shared  # the two tasks' own rests, padded to the longer one
    assert counts[True, 2] == shared + 2 * rest and counts[False, 2] == 6 * max(openings)


def test_roles_round_trip_to_what_the_environment_saw_and_said(model, tokenizer):
    generator = GroupGenerator(ScriptedEnv, tokenizer, SamplingSettings(max_new_tokens=10, max_turns=3))
    rollouts, _ = generator.generate_group(model, seed=0, group_size=2)
    end = tokenizer.convert_tokens_to_ids(END)
    for rollout, env in zip(rollouts, _envs(generator)):
        spans = role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
        actions = [text for role, text in spans if role == Role.ACTION]
        observations = [text for role, text in spans if role == Role.OBSERVATION]
        assert observations == env.observations  # exactly the environment's text, special-token lookalikes too
        # Each ACTION span is the text the environment received, plus the end-of-turn token when it was sampled.
        sampled_end = [rollout.input_ids[t] == end and rollout.roles[t] == Role.ACTION
                       for t in range(len(rollout)) if t + 1 == len(rollout) or rollout.roles[t + 1] != Role.ACTION]
        assert len(actions) == len(env.actions) == 3
        for text, action, ended in zip(actions, env.actions, sampled_end):
            assert text == action + (END if ended else "")


def test_long_observations_are_cut_with_a_visible_notice(model, tokenizer):
    settings = SamplingSettings(max_new_tokens=4, max_turns=1, max_observation_chars=50)
    generator = GroupGenerator(lambda: ScriptedEnv(observation_chars=130), tokenizer, settings)
    (rollout,), _ = generator.generate_group(model, seed=0, group_size=1)
    observation = [text for role, text in role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
                   if role == Role.OBSERVATION]
    assert observation == [truncate_observation("x" * 130, 50)]
    assert observation[0] == "x" * 50 + "\n[observation truncated: 80 more characters]\n"


def test_max_total_tokens_stops_the_rollout(model, tokenizer):
    prompt = len(RolloutBuilder(tokenizer, ScriptedEnv().reset(0)).prompt_ids())
    settings = SamplingSettings(max_new_tokens=64, max_turns=3, max_total_tokens=prompt + 6)
    generator = GroupGenerator(ScriptedEnv, tokenizer, settings)
    (rollout,), stats = generator.generate_group(model, seed=0, group_size=1)
    assert rollout.metadata["stop_reason"] == "max_total_tokens"
    assert sum(r == Role.ACTION for r in rollout.roles) <= 5  # one position is kept for the end-of-turn token
    assert stats.sampled_tokens <= 5


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_environment_ends_only_its_rollout(model, tokenizer, mode):
    settings = SamplingSettings(max_new_tokens=6, max_turns=3, env_step_timeout_s=0.5)
    generator = GroupGenerator(lambda: FailingEnv(mode), tokenizer, settings)
    started = time.perf_counter()
    rollouts, stats = generator.generate_group(model, seed=0, group_size=2)
    assert time.perf_counter() - started < 30  # the hanging step (60 s) was not waited for
    message = "[environment error: ValueError: boom]" if mode == "raise" else \
        "[environment error: step timed out after 0.5 s]"
    for rollout in rollouts:
        assert rollout.reward == 0.0  # the turn-1 reward is void
        assert rollout.metadata["stop_reason"] == "env_error" and rollout.metadata["env_error"] == message
        assert rollout.metadata["turns"] == 2
        spans = role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
        assert spans[-2] == (Role.WARNING, message)  # a harness message, not environment text to learn
    assert stats.env_errors == 2 and stats.env_timeouts == (2 if mode == "hang" else 0)
    if mode == "hang":  # hung instances are never reused
        assert all(env.turn == 0 for env in _envs(generator))
    # The generator keeps working.
    rollouts, _ = generator.generate_group(model, seed=1, group_size=2)
    assert len(rollouts) == 2


def test_a_group_plays_one_task_in_g_environment_instances(model, tokenizer):
    generator = GroupGenerator(lambda: ShellWorld("train"), tokenizer,
                               SamplingSettings(max_new_tokens=8, max_turns=2))
    rollouts, stats = generator.generate_group(model, seed=5, group_size=3, group_id="shell-5")
    envs = _envs(generator)
    assert len({id(env) for env in envs}) == 3 and all(env.seed == 5 for env in envs)
    question = ShellWorld("train").reset(5)[-1]["content"]
    for rollout in rollouts:
        assert rollout.group_id == "shell-5" and rollout.metadata["task"] == question
        assert rollout.metadata["task_type"] == envs[0].task.type
    assert stats.rollouts == 3 and stats.sampled_tokens > 0 and stats.seconds > 0


def test_4bit_generate_then_train_keeps_every_lora_gradient(tiny_checkpoint, tokenizer):
    """platform.md: after generate, bitsandbytes' CPU repacking would cut LoRA gradients; the guard keeps them."""
    torch.manual_seed(0)
    model = models.build_model(str(tiny_checkpoint), quantization="4bit", lora_rank=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # non-zero B, so lora_A gets a gradient too
    generator = GroupGenerator(lambda: ShellWorld("train"), tokenizer,
                               SamplingSettings(max_new_tokens=8, max_turns=2))
    for _ in range(2):  # alternate: generate, train, generate, train
        model.train()
        rollouts, _ = generator.generate_group(model, seed=0, group_size=2)
        assert model.training
        ids = torch.tensor([rollouts[0].input_ids])
        hidden = models.hidden_states(model, ids, torch.ones_like(ids))[:, :-1]
        logp = chunked_logprobs(hidden, models.output_head(model), ids[:, 1:])
        model.zero_grad(set_to_none=True)
        (-logp.mean()).backward()
        lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        missing = [n for n, p in lora if p.grad is None or not p.grad.abs().sum() > 0]
        assert lora and not missing, f"{len(missing)} of {len(lora)} LoRA parameters got no gradient"
