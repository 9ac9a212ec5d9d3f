"""Environment faults end one rollout, never the run: bad return values, exceptions, hangs (in worker processes),
dying workers, and SIGTERM to a generating process. Real tiny model, real tokenizer, real worker processes.

Time limits are asserted by *termination* (a generous process timeout or the step's own limit reported back),
never by a speed threshold.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from envs_for_tests import BAD_VALUES, FaultEnv

from lit_echo import models
from lit_echo.advantages import grpo_advantages
from lit_echo.chat import role_spans_text
from lit_echo.envs.base import EnvSpec, StepResult, import_env_class, truncate_observation
from lit_echo.online.env_runner import BadStepResult, ProcessEnv, StepFailure, check_step_result, guarded_step, step_all
from lit_echo.online.generator import GroupGenerator, SamplingSettings
from lit_echo.online.writer import RolloutWriter
from lit_echo.roles import Role

TESTS = str(Path(__file__).parent)


def spec(fault: str = "none", at_turn: int = 1, **kwargs) -> EnvSpec:
    return EnvSpec("envs_for_tests.FaultEnv", {"fault": fault, "at_turn": at_turn, **kwargs})


# ------------------------------------------------------------------------------------------ checking returns
EXPECTED_REASON = {
    "observation None": "observation is NoneType, expected str",
    "observation int": "observation is int, expected str",
    "reward nan": "reward is nan, expected a finite number",
    "reward inf": "reward is inf, expected a finite number",
    "reward -inf": "reward is -inf, expected a finite number",
    "reward 1e200": "reward is 1e+200, beyond float32 range",
    "reward huge int": "reward is an integer of 1329 bits, beyond float32 range",
    "reward huge Fraction": "reward is a Fraction with 5000 digits, beyond float32 range",
    "reward bool": "reward is bool, expected a real number",
    "reward str": "reward is str, expected a real number",
    "info list": "info is list, expected dict",
    "info None": "info is NoneType, expected dict",
    "done str": "done is 'yes' (str), expected a bool",
    "warning bytes": "warning is bytes, expected str or None",
    "task_type int": "info['task_type'] is int, expected str",
    "observation surrogate": "observation is not valid Unicode",
    "not a StepResult": "step returned dict, expected lit_echo.envs.base.StepResult",
}


@pytest.mark.parametrize("fault", sorted(BAD_VALUES))
def test_bad_returns_are_named(fault):
    with pytest.raises(BadStepResult, match=EXPECTED_REASON[fault].replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        check_step_result(BAD_VALUES[fault]())


def test_good_returns_are_normalised():
    import numpy as np

    result = check_step_result(StepResult("x" * 50, "w" * 30, np.float32(0.25), np.bool_(True),
                                          {"success": 1, "valid_action": np.bool_(False), "task_type": "t"}), 20)
    assert result.observation == truncate_observation("x" * 50, 20) and result.warning == truncate_observation(
        "w" * 30, 20)
    assert type(result.reward) is float and result.reward == 0.25 and result.done is True
    assert result.info == {"success": True, "valid_action": False, "task_type": "t"}
    assert check_step_result(StepResult("", reward=3)).reward == 3.0  # ints are rewards too


def test_huge_observation_is_cut_inside_the_guarded_region():
    class Huge:
        def step(self, action):
            return StepResult("y" * 5_000_000 + "\ud800")  # the bad tail is cut off before it is looked at

    result = guarded_step(Huge(), "a", max_observation_chars=100)
    assert result.observation == truncate_observation("y" * 5_000_001, 100)


def test_guarded_step_turns_exceptions_into_failures():
    class Raises:
        def step(self, action):
            raise KeyError("x" * 10_000)

    class BadStr(Exception):
        def __str__(self):
            raise RuntimeError("no text")

    class RaisesBadStr:
        def step(self, action):
            raise BadStr()

    failure = guarded_step(Raises(), "a")
    assert isinstance(failure, StepFailure) and failure.message.startswith("[environment error: KeyError: 'xxx")
    assert len(failure.message) < 600  # an exception's text is cut
    assert guarded_step(RaisesBadStr(), "a").message == "[environment error: BadStr]"


def test_truncated_flag_reaches_environments_that_accept_it():
    class Plain:
        def step(self, action):
            return StepResult(action)

    (cut, plain), = [step_all([FaultEnv(), Plain()], ["a", "b"], 5, truncated=[True, True])]
    assert cut.observation == "turn 1 (cut)\n" and plain.observation == "b"


# ------------------------------------------------------------------------------------------ worker processes
@pytest.mark.parametrize("fault", ["sleep", "busy", "regex"])
def test_hanging_steps_are_killed_in_process_mode(fault):
    envs = [ProcessEnv(spec(fault), timeout_s=1.0), ProcessEnv(spec("none"), timeout_s=1.0)]
    try:
        for env in envs:
            env.reset(0)
        hung, fine = step_all(envs, ["a", "b"], 1.0)
        assert hung == StepFailure("[environment error: step timed out after 1 s]", timed_out=True)
        assert isinstance(fine, StepResult) and fine.observation == "turn 1\n"
        assert not envs[0].alive and envs[1].alive  # killed, not left running
    finally:
        for env in envs:
            env.close()
    assert not envs[1].alive


def test_a_dying_worker_is_a_failure_not_a_crash():
    env = ProcessEnv(spec("exit"), timeout_s=5.0)
    env.reset(0)
    (failure,) = step_all([env], ["a"], 5.0)
    assert failure == StepFailure("[environment error: worker process died (exit code 3)]")
    env.close()


def test_unpicklable_info_fails_only_that_step():
    env = ProcessEnv(spec("unpicklable info"), timeout_s=10.0)
    env.reset(0)
    failure, ok = step_all([env], ["a"], 10.0) + step_all([env], ["b"], 10.0)
    assert failure.message.startswith("[environment error: cannot send the step's result from the worker process")
    assert ok.observation == "turn 2\n"  # the worker lives on
    env.close()


def test_construction_errors_are_raised_with_their_cause():
    with pytest.raises(RuntimeError, match="construction failed in its worker process: ImportError"):
        ProcessEnv(EnvSpec("no_such_module_here.Env"), timeout_s=10.0)
    with pytest.raises(TypeError, match="cannot be pickled"):
        ProcessEnv(lambda: FaultEnv(), timeout_s=10.0)


def test_a_data_module_entry_is_an_env_spec_and_its_name_reaches_the_worker_messages():
    """``data.envs`` entries are EnvSpecs (picklable, process isolation works) and keep their configured name,
    which timeout and failure messages use; a bad class path names the configuration entry."""
    from lit_echo.online.datamodule import _env_specs

    (entry,) = _env_specs(None, None, [{"class_path": "envs_for_tests.FaultEnv", "name": "faulty",
                                        "init_args": {"fault": "none"}, "weight": 2}])
    assert isinstance(entry, EnvSpec) and entry.weight == 2.0 and entry.option == "data.envs[0]"
    env = ProcessEnv(entry, timeout_s=10.0)
    try:
        assert env.name == "faulty"
        assert env.reset(3)[-1] == {"role": "user", "content": "Task 3."}
    finally:
        env.close()
    assert EnvSpec("envs_for_tests.FaultEnv").name == "FaultEnv"
    with pytest.raises(Exception, match=r"data\.envs\[1\]"):
        EnvSpec("no_such_module_here.Env", option="data.envs[1]")()


def test_process_mode_needs_a_picklable_factory(tiny_tokenizer):
    with pytest.raises(TypeError, match="EnvSpec"):
        GroupGenerator(lambda: FaultEnv(), tiny_tokenizer, SamplingSettings(env_isolation="process"))
    with pytest.raises(ValueError, match="env_isolation"):
        SamplingSettings(env_isolation="fork")


def test_import_env_class_lives_in_envs_base():
    from lit_echo.envs.shellworld import ShellWorld
    from lit_echo.online import datamodule

    assert import_env_class("lit_echo.envs.shellworld.ShellWorld") is ShellWorld
    assert datamodule.import_env_class is import_env_class  # the old import path keeps working


# ------------------------------------------------------------------------------------------ through the generator
@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    torch.manual_seed(0)
    return models.build_model(str(tiny_checkpoint), lora_rank=4)


# Through the whole generator (a tiny model sampling) the faults share one path: a few in the default suite.
DEFAULT_FAULTS = {"observation None", "observation int", "reward nan", "reward 1e200", "info list"}


@pytest.mark.parametrize("fault", [f if f in DEFAULT_FAULTS else pytest.param(f, marks=pytest.mark.slow)
                                   for f in sorted(BAD_VALUES)])
def test_a_bad_return_ends_only_its_rollout(model, tokenizer, tmp_path, caplog, fault):
    settings = SamplingSettings(max_new_tokens=4, max_turns=3)
    generator = GroupGenerator(lambda: FaultEnv(fault, at_turn=2), tokenizer, settings)
    with caplog.at_level(logging.WARNING, logger="lit_echo.online.generator"):
        rollouts, stats = generator.generate_group(model, seed=0, group_size=2)
    reason = EXPECTED_REASON[fault]
    assert stats.env_errors == 2 and stats.env_timeouts == 0
    for rollout in rollouts:
        assert rollout.metadata["stop_reason"] == "env_error" and reason in rollout.metadata["env_error"]
        assert rollout.reward == 0.0 and rollout.metadata["turns"] == 2
        spans = role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
        assert spans[-2] == (Role.WARNING, rollout.metadata["env_error"])
    assert sum(reason in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records) == 2
    # Nothing non-finite reaches the advantages or the buffer.
    advantages = grpo_advantages([r.reward for r in rollouts], [r.group_id for r in rollouts])
    assert all(math.isfinite(a) for a in advantages)
    for rollout, advantage in zip(rollouts, advantages):
        rollout.advantage = advantage
    writer = RolloutWriter(tmp_path / "r.jsonl")
    writer.write_group(rollouts)
    writer.close()
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["reward"] for line in lines] == [0.0, 0.0]


def test_reward_sum_beyond_float32_fails_the_rollout(model, tokenizer):
    class Big(FaultEnv):
        def step(self, action, truncated=False):
            return StepResult("x", reward=3e38)

    generator = GroupGenerator(Big, tokenizer, SamplingSettings(max_new_tokens=3, max_turns=3))
    (rollout,), _ = generator.generate_group(model, seed=0, group_size=1)
    assert "reward sum 6e+38 is beyond float32 range" in rollout.metadata["env_error"] and rollout.reward == 0.0


@pytest.mark.parametrize("fault", ["regex"] + [pytest.param(f, marks=pytest.mark.slow) for f in ("busy", "sleep",
                                                                                                  "exit")])
def test_process_mode_ends_hung_rollouts_and_replaces_workers(model, tokenizer, fault):
    settings = SamplingSettings(max_new_tokens=4, max_turns=3, env_step_timeout_s=1.0, env_isolation="process")
    generator = GroupGenerator(spec(fault, at_turn=2), tokenizer, settings)
    try:
        rollouts, stats = generator.generate_group(model, seed=0, group_size=2)
        old_workers = [env.process for env in generator._envs]
        message = ("[environment error: worker process died (exit code 3)]" if fault == "exit"
                   else "[environment error: step timed out after 1 s]")
        for rollout in rollouts:
            assert rollout.metadata["env_error"] == message and rollout.metadata["turns"] == 2
            assert rollout.metadata["env"] == "FaultEnv"
        assert stats.env_timeouts == (0 if fault == "exit" else 2)
        assert all(env.alive for env in generator._envs)  # replaced by fresh workers
        rollouts, _ = generator.generate_group(model, seed=1, group_size=2)  # and the generator goes on
        assert len(rollouts) == 2
    finally:
        generator.close()
    assert not any(p.poll() is None for p in old_workers) and generator._envs == []


@pytest.mark.slow
def test_process_mode_roles_match_thread_mode(model, tokenizer):
    """The same seeds give the same rollouts whether the environment runs in a thread or a worker process."""
    results = {}
    for isolation in ("thread", "process"):
        factory = spec("none") if isolation == "process" else (lambda: FaultEnv("none"))
        generator = GroupGenerator(factory, tokenizer, SamplingSettings(max_new_tokens=5, max_turns=3,
                                                                         env_isolation=isolation))
        torch.manual_seed(3)
        rollouts, _ = generator.generate_group(model, seed=2, group_size=2)
        generator.close()
        results[isolation] = [(r.input_ids, r.roles, r.reward) for r in rollouts]
    assert results["thread"] == results["process"]


# ------------------------------------------------------------------------------------------ SIGTERM
_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from lit_echo import models
    from lit_echo.envs.base import EnvSpec
    from lit_echo.online.generator import GroupGenerator, SamplingSettings
    from lit_echo.online.writer import RolloutWriter
    from lit_echo.advantages import grpo_advantages

    tokenizer = models.load_tokenizer({checkpoint!r})
    model = models.build_model({checkpoint!r}, lora_rank=4)
    # Busy-loops at turn 2 of every episode after the first group, with a limit far beyond the test's patience.
    settings = SamplingSettings(max_new_tokens=4, max_turns=3, env_step_timeout_s=600, env_isolation="process")
    spec = EnvSpec("envs_for_tests.FaultEnv", {{"fault": "busy", "at_turn": 2, "from_seed": 1,
                                                "pid_file": {pids!r}}})
    generator = GroupGenerator(spec, tokenizer, settings)
    writer = RolloutWriter({out!r})
    seed = 0
    while True:
        rollouts, _ = generator.generate_group(model, seed, 2)
        for r, a in zip(rollouts, grpo_advantages([r.reward for r in rollouts], [r.group_id for r in rollouts])):
            r.advantage = a
        writer.write_group(rollouts)
        print("group written", flush=True)
        seed += 1
""")


def test_sigterm_stops_a_run_with_a_hung_worker(tiny_checkpoint, tmp_path):
    out, pids = tmp_path / "rollouts.jsonl", tmp_path / "pids.txt"
    script = _SIGTERM_SCRIPT.format(tests=TESTS, checkpoint=str(tiny_checkpoint), pids=str(pids), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(TESTS).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # The first group is written; the second hangs in its workers' turn 2.
        started = time.monotonic()
        while time.monotonic() - started < 120:
            if out.exists() and len(out.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        time.sleep(3.0)  # let the second group's step start hanging
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # generous: it stops at once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM
    # What was written is valid JSONL: the first group, whole.
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["metadata"]["env_seed"] for r in records] == [0, 0]
    # No worker outlives the trainer (they get SIGKILL when their parent goes).
    deadline = time.monotonic() + 30
    alive = [int(p) for p in pids.read_text().split()]
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _exists(p)]
        time.sleep(0.2)
    assert not alive, f"worker processes {alive} outlived the trainer"


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (dead) parent's reaper does not count
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_failure_text_is_valid_unicode():
    """Found by the fuzz suite: an exception message with a lone surrogate crashed the tokenizer."""
    class Raises:
        def step(self, action):
            raise ValueError("bad \ud800 text")

    failure = guarded_step(Raises(), "a")
    assert failure.message == "[environment error: ValueError: bad \\ud800 text]"
    failure.message.encode("utf-8")
