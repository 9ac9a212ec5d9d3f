"""Environment lifetimes: every instance and worker process the online data path starts is ended by its owner.

The generator owns its instances (and closes a thread-mode instance whose step overran only once that step has
returned); the data module owns its generators (closed when a data loader is rebuilt and at teardown); the
start-up check builds its instance where the run would (a worker process under ``env_isolation: process``) and
under the run's time limit. Leftover worker processes are counted as this process's children
(``/proc/self/task/*/children``: a zombie nobody reaped still counts), so nothing depends on psutil.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import threading
import time

import lightning as L
import pytest
import torch
from envs_for_tests import FaultEnv

from lit_echo import models
from lit_echo.envs.base import EnvSpec, StepResult
from lit_echo.module import EchoModule
from lit_echo.online import OnlineRolloutDataModule
from lit_echo.online.env_runner import ProcessEnv
from lit_echo.online.generator import GroupGenerator, SamplingSettings


def _children() -> set[int]:
    """Pids of this process's children, reaped or not (a zombie is listed until it is waited for)."""
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as f:
                pids.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return pids


def _open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def _left_over(before: set[int], wait_s: float = 3.0) -> set[int]:
    """Children started since ``before`` that are still there after up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    left = _children() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _children() - before
    return left


def _with_limit(fn, limit_s: float):
    """``fn()``'s exception (or None) and its wall time, failing the test if it has not returned after
    ``limit_s`` (the call is left running in a daemon thread: the code under test hangs)."""
    box: dict = {}

    def run() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001  (handed to the test)
            box["error"] = err

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running after {limit_s} s"
    return box.get("error"), time.monotonic() - started


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    torch.manual_seed(0)
    return models.build_model(str(tiny_checkpoint), lora_rank=4)


# ------------------------------------------------------------------------------------------ (a) data loaders
class _CountingData(OnlineRolloutDataModule):
    def train_dataloader(self):
        self.train_loads = getattr(self, "train_loads", 0) + 1
        return super().train_dataloader()

    def val_dataloader(self):
        self.val_loads = getattr(self, "val_loads", 0) + 1
        return super().val_dataloader()


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_reloaded_data_loaders_and_teardown_leave_no_worker(tiny_checkpoint, tmp_path, monkeypatch, isolation):
    """A fit that rebuilds its training and validation loaders every epoch ends with every environment closed:
    each rebuild closes the generators it replaces, and teardown closes the last ones. Process mode: no worker
    process is left (the test keeps a reference to every worker, so none goes away just by being dropped and
    garbage-collected); thread mode: every instance's ``close()`` ran."""
    from envs_for_lifetimes import Tracked

    workers: list[ProcessEnv] = []
    real = ProcessEnv.__init__

    def keep(self, *args, **kwargs):
        workers.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ProcessEnv, "__init__", keep)
    monkeypatch.setattr(Tracked, "instances", [])
    before = _children()
    data = _CountingData(env_class="envs_for_lifetimes.Tracked", val_env_kwargs={}, val_episodes=1, group_size=2,
                         max_new_tokens=2, max_turns=1, max_total_tokens=256, env_isolation=isolation,
                         env_step_timeout_s=30.0, buffer_dir=None, tokenizer=str(tiny_checkpoint), max_length=256)
    assert not _left_over(before, wait_s=0.0)  # the start-up check's worker is gone already
    torch.manual_seed(0)
    module = EchoModule(model_name_or_path=str(tiny_checkpoint), lora_rank=4, lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, limit_train_batches=1, limit_val_batches=1,
                        reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3 and data.train_loads >= 3 and data.val_loads >= 3
    assert data._generators == {} and data._val_generators == {}
    if isolation == "process":
        assert len(workers) >= 1 + 2 * 3  # the check, then at least one per loader built
        assert [env.process.pid for env in workers if env.process.poll() is None] == []
        assert not _left_over(before, wait_s=0.0), "worker processes outlived the fit"
    else:
        assert workers == [] and len(Tracked.instances) >= 1 + 2 * 3
        assert [instance.closed for instance in Tracked.instances] == [1] * len(Tracked.instances)


# ------------------------------------------------------------------------------------------ (b) step timeouts
def test_a_step_timeout_in_process_mode_leaves_no_worker(model, tokenizer):
    before = _children()
    settings = SamplingSettings(max_new_tokens=2, max_turns=2, env_step_timeout_s=0.5, env_isolation="process")
    generator = GroupGenerator(EnvSpec("envs_for_tests.FaultEnv", {"fault": "sleep"}), tokenizer, settings)
    try:
        rollouts, stats = generator.generate_group(model, seed=0, group_size=2)
        assert stats.env_timeouts == 2
        assert all(env.alive for env in generator._envs)  # the killed workers were replaced
    finally:
        generator.close()
    assert not _left_over(before)


class _SlowStep(FaultEnv):
    """In-process: ``step`` sleeps ``step_s`` seconds; every call is logged as ``(instance, event)``."""

    def __init__(self, events: list, step_s: float):
        super().__init__("none")
        self.events, self.step_s, self.stepping = events, step_s, False
        self.id = sum(1 for _, event in events if event == "built")
        events.append((self.id, "built"))

    def step(self, action: str, truncated: bool = False) -> StepResult:
        self.stepping = True
        self.events.append((self.id, "step"))
        time.sleep(self.step_s)
        self.events.append((self.id, "step returned"))
        self.stepping = False
        return StepResult("late\n", done=True)

    def close(self) -> None:
        self.events.append((self.id, "close during step" if self.stepping else "close"))


def test_a_timed_out_thread_instance_is_closed_only_after_its_step_returns(model, tokenizer):
    """Thread mode cannot stop a step: the instance is retired, left alone while its step runs, and closed once
    the step returns, even when the generator is closed before that."""
    events: list = []
    threads_before = set(threading.enumerate())
    settings = SamplingSettings(max_new_tokens=2, max_turns=1, env_step_timeout_s=0.3)
    generator = GroupGenerator(lambda: _SlowStep(events, step_s=1.5), tokenizer, settings)
    (rollout,), stats = generator.generate_group(model, seed=0, group_size=1)
    assert stats.env_timeouts == 1 and rollout.metadata["stop_reason"] == "env_error"
    generator.close()  # closes the replacement now; the retired instance is still stepping
    assert (0, "step returned") not in events
    deadline = time.monotonic() + 10
    while (0, "close") not in events and (0, "close during step") not in events and time.monotonic() < deadline:
        time.sleep(0.05)
    mine = [event for i, event in events if i == 0]
    assert mine == ["built", "step", "step returned", "close"]
    assert [event for i, event in events if i == 1] == ["built", "close"]  # the replacement, never used
    def ours() -> list[str]:  # the step, retire and close threads this test started
        return [t.name for t in set(threading.enumerate()) - threads_before if t.name.startswith("env-")]

    deadline = time.monotonic() + 5
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours() == []


# ------------------------------------------------------------------------------------------ (c) start-up failure
def test_a_worker_that_fails_at_start_up_is_reaped(monkeypatch):
    """A worker that fails during construction or exits before its handshake is reaped, its socket closed,
    before the error propagates."""
    before, fds = _children(), _open_fds()
    with pytest.raises(RuntimeError, match="construction failed in its worker process: ImportError"):
        ProcessEnv(EnvSpec("no_such_module_here.Env"), timeout_s=10.0)
    assert not _left_over(before, wait_s=0.0) and _open_fds() == fds
    # The worker exits at once (here: it is not even Python) while the trainer still sends it a factory larger
    # than the socket's buffer: the send fails.
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    big = EnvSpec("envs_for_tests.FaultEnv", {"fault": "x" * 8_000_000})
    with pytest.raises(RuntimeError, match=r"FaultEnv construction failed: its worker process exited"):
        ProcessEnv(big, timeout_s=10.0)
    assert not _left_over(before, wait_s=0.0) and _open_fds() == fds
    with pytest.raises(RuntimeError, match="worker process"):
        GroupGenerator(big, None, SamplingSettings(env_isolation="process"))
    assert not _left_over(before, wait_s=0.0) and _open_fds() == fds


# ------------------------------------------------------------------------------------------ (d) start-up check
@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_the_start_up_check_honours_isolation_and_the_time_limit(isolation):
    """The data module's construction-time check builds and resets the environment where the run would, under
    ``env_step_timeout_s``: a reset that hangs is a clear error naming the option and the limit, not a hung CLI,
    and (process mode) its worker is killed."""
    before = _children()
    error, _ = _with_limit(lambda: OnlineRolloutDataModule(
        env_class="envs_for_lifetimes.SlowReset", env_kwargs={"reset_s": 4.0}, env_isolation=isolation,
        env_step_timeout_s=0.5, buffer_dir=None), limit_s=3.0)
    assert isinstance(error, TimeoutError), error
    message = str(error)
    assert "data.env_class/data.env_kwargs" in message and "reset(0)" in message
    assert "data.env_step_timeout_s=0.5 s" in message and f"env_isolation={isolation!r}" in message
    assert not _left_over(before, wait_s=0.0)
    if isolation == "process":  # and it ran there, not here: a worker was started
        seen: list[int] = []
        real = ProcessEnv.__init__

        def spy(self, *args, **kwargs):
            try:
                real(self, *args, **kwargs)
            finally:
                seen.append(self.process.pid)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ProcessEnv, "__init__", spy)
            OnlineRolloutDataModule(env_class="envs_for_lifetimes.SlowReset", env_isolation="process",
                                    buffer_dir=None)
        assert len(seen) == 1 and not _left_over(before, wait_s=0.0)
