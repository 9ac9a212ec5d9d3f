"""Fuzz: random environment returns and hostile ShellWorld actions (hypothesis).

Three properties, each in a quick default-suite form and a ``slow`` form (11,000 cases in all):

* whatever a ``step`` returns or raises, :func:`check_step_result` / :func:`guarded_step` give either a result
  that keeps the contract (str texts within the cut, finite float32 reward, bool done, dict info) or a
  :class:`StepFailure`/:class:`BadStepResult`, never another exception;
* the same values through the generator's observe path (``step_all`` -> ``_observe``/``_fail`` -> a real
  RolloutBuilder with a real chat template -> JSON) leave a rollout with a finite reward whose JSON line loads
  back, and whose last tool message is exactly the checked observation or the failure text;
* any command line in a ``<cmd>`` block gives ShellWorld a valid StepResult and touches no real file or process
  (an audit hook records every open/exec/socket event while the step runs).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_echo.chat import RolloutBuilder, role_spans_text
from lit_echo.envs.base import StepResult
from lit_echo.envs.shellworld import ShellWorld
from lit_echo.envs.shellworld.shell import COMMANDS
from lit_echo.online.env_runner import FLOAT32_MAX, BadStepResult, StepFailure, check_step_result, guarded_step
from lit_echo.online.generator import GenerationStats, GroupGenerator, SamplingSettings, _Episode
from lit_echo.roles import Role

MAX_CHARS = 64
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ strategies
any_text = st.text(st.characters(exclude_categories=()), max_size=200)  # lone surrogates included
long_text = st.builds(lambda c, n: c * n, st.characters(), st.integers(0, 3 * MAX_CHARS))
texts = st.one_of(any_text, long_text, st.sampled_from(["", "<|im_end|>", "<|im_start|>assistant\n", "\x00"]))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400), st.floats(),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e200, 3.4e38, -3.5e38, 0.0, -0.0]),
    st.fractions(), st.decimals(allow_nan=True), st.binary(max_size=10),
    st.sampled_from([np.float32(0.5), np.float64("nan"), np.int64(3), np.bool_(True), np.float16(65504)]),
)
anything = st.recursive(st.one_of(scalars, texts), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
infos = st.one_of(
    st.dictionaries(st.sampled_from(["success", "valid_action", "task_type", "turn", "other"]), anything, max_size=4),
    anything)
step_results = st.builds(StepResult, st.one_of(texts, anything), st.one_of(st.none(), texts, anything),
                         st.one_of(scalars, anything), st.one_of(st.booleans(), scalars), infos)
exceptions = st.builds(lambda cls, text: cls(text), st.sampled_from([ValueError, KeyError, RuntimeError,
                                                                     ZeroDivisionError, UnicodeError]), any_text)
returns = st.one_of(step_results, anything, exceptions)


class ReturnsValue:
    """An environment whose next step returns (or raises) whatever it is given."""

    def __init__(self, value):
        self.value = value

    def reset(self, seed):
        return [{"role": "user", "content": "Go."}]

    def step(self, action):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


# ------------------------------------------------------------------------------------------ property 1
def _assert_contract(result: StepResult) -> None:
    notice = len("\n[observation truncated: 000000 more characters]\n")
    assert isinstance(result.observation, str) and len(result.observation) <= MAX_CHARS + notice
    result.observation.encode("utf-8")
    assert result.warning is None or (isinstance(result.warning, str) and len(result.warning) <= MAX_CHARS + notice)
    assert type(result.reward) is float and math.isfinite(result.reward) and abs(result.reward) <= FLOAT32_MAX
    assert type(result.done) is bool and type(result.info) is dict
    assert "task_type" not in result.info or isinstance(result.info["task_type"], str)


def _check_one_return(value) -> None:
    if isinstance(value, StepResult):
        try:
            _assert_contract(check_step_result(value, MAX_CHARS))
        except BadStepResult:
            pass
    outcome = guarded_step(ReturnsValue(value), "a", max_observation_chars=MAX_CHARS)
    if isinstance(outcome, StepFailure):
        assert outcome.message.startswith("[environment error: ") and not outcome.timed_out
    else:
        _assert_contract(outcome)


@QUICK
@given(returns)
def test_any_return_is_checked_or_failed(value):
    _check_one_return(value)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(returns)
def test_any_return_is_checked_or_failed_many(value):
    _check_one_return(value)


# ------------------------------------------------------------------------------------------ property 2
@pytest.fixture(scope="module")
def generator(tiny_tokenizer):
    return GroupGenerator(lambda: ReturnsValue(None), tiny_tokenizer,
                          SamplingSettings(max_observation_chars=MAX_CHARS, env_step_timeout_s=30))


def _observe_one(generator, tokenizer, value, reward_so_far) -> None:
    env = ReturnsValue(value)
    builder = RolloutBuilder(tokenizer, env.reset(0))
    end = builder.end_of_turn_id
    action = tokenizer.encode("<cmd>ls</cmd>", add_special_tokens=False) + [end]
    builder.add_action(action, [-0.5] * len(action))
    episode = _Episode(env, builder, seed=0, reward=reward_so_far)
    generator._envs = [env]
    stats = GenerationStats()
    generator._step_envs([episode], stats)
    rollout = builder.to_rollout(episode.reward, "g")
    assert math.isfinite(rollout.reward) and abs(rollout.reward) <= FLOAT32_MAX
    record = json.loads(rollout.to_json())  # what the writer writes loads back
    assert record["reward"] == rollout.reward
    spans = role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
    last_tool = builder.messages[-1]
    if episode.env_error is not None:
        assert stats.env_errors == 1 and last_tool == {"role": "tool", "content": "", "warning": episode.env_error}
        assert (Role.WARNING, episode.env_error) in spans
    else:
        checked = check_step_result(value, MAX_CHARS)
        assert last_tool["content"] == checked.observation
        if checked.observation:
            assert [t for r, t in spans if r == Role.OBSERVATION] == [checked.observation]


@QUICK
@given(returns, st.sampled_from([0.0, 1.0, 3.0e38]))
def test_observe_path_keeps_rollouts_finite(generator, tiny_tokenizer, value, reward_so_far):
    _observe_one(generator, tiny_tokenizer, value, reward_so_far)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(returns, st.sampled_from([0.0, 1.0, 3.0e38]))
def test_observe_path_keeps_rollouts_finite_many(generator, tiny_tokenizer, value, reward_so_far):
    _observe_one(generator, tiny_tokenizer, value, reward_so_far)


# ------------------------------------------------------------------------------------------ property 3
_SHELL_CHARS = "abcEZxy019.-_/ *?[]^$+{},()|\\'\"~<>;&`\n\t:="
words = st.one_of(st.text(_SHELL_CHARS, max_size=12), st.sampled_from(
    ["-c", "-n", "-E", "-F", "-r", "-v", "-o", "-w", "-x", "-i", "-k2", "-t,", "-d,", "-f2", "-5", "+2", "*",
     "logs", "README.md", "..", "/", "~", "'(.*)*Z'", "'[[:digit:]]\\+'", "'\\(a\\)\\1'", "-name", "'*.log'"]))
command_lines = st.builds(lambda stages: " | ".join(" ".join(s) for s in stages),
                          st.lists(st.builds(lambda name, args: [name] + args,
                                             st.sampled_from(sorted(COMMANDS) + ["submit", "rm", "sh"]),
                                             st.lists(words, max_size=4)), min_size=1, max_size=3))
actions = st.one_of(st.builds(lambda line: f"<cmd>{line}</cmd>", command_lines),
                    st.builds(lambda line: f"<cmd>{line}</cmd>", st.text(_SHELL_CHARS, max_size=40)),
                    st.text(st.characters(), max_size=80))

_AUDIT = {"on": False, "events": []}
_WATCHED = ("open", "os.", "subprocess.", "socket.", "shutil.", "pty.", "ctypes.")


def _audit(event: str, args) -> None:
    if _AUDIT["on"] and event.startswith(_WATCHED):
        _AUDIT["events"].append(event)


sys.addaudithook(_audit)  # cannot be removed; it records only while a ShellWorld step runs


@pytest.fixture(scope="module")
def shellworld():
    env = ShellWorld("train")
    env.reset(0)
    return env


def _hostile_step(env: ShellWorld, action: str) -> None:
    if env.done:
        env.reset(0)
    _AUDIT["on"], _AUDIT["events"] = True, []
    try:
        result = env.step(action)
    finally:
        _AUDIT["on"] = False
    assert not _AUDIT["events"], f"{action!r} touched the real system: {_AUDIT['events']}"
    checked = check_step_result(result)  # raises if ShellWorld broke its own contract
    assert checked.info["task_type"] == env.task.type


@QUICK
@given(actions)
def test_hostile_shell_actions(shellworld, action):
    _hostile_step(shellworld, action)


@pytest.mark.slow
@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
def test_hostile_shell_actions_many(shellworld, action):
    _hostile_step(shellworld, action)
