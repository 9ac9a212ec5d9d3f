"""Running environment steps safely: a time limit per step, every return checked, errors turned into values.

An online run must survive a broken or hanging environment: one bad step ends that rollout, never the run. The
guarded region is everything between the generator handing over an action and getting back a
:class:`StepResult` it can trust: the call itself, the check of what it returned (:func:`check_step_result`) and
the cut of long observations (:func:`~lit_echo.envs.base.truncate_observation`). What goes wrong in it comes back
as a :class:`StepFailure`.

Two ways to run the G steps of a turn (``SamplingSettings.env_isolation``):

* ``"thread"``: each step in its own daemon thread, joined against one shared deadline. Cheap, and enough for
  environments that cannot hang (ShellWorld bounds its own work). Python cannot kill a thread: a step over the
  limit keeps running in the background (holding the GIL if it is stuck in C code) and its instance is retired:
  the :class:`StepFailure` carries the still-running thread, and :func:`close_after` closes the instance only
  once that step has returned (never, if it never returns), not under it.
* ``"process"``: each instance lives in its own worker process (:class:`ProcessEnv`, built there from a picklable
  factory such as :class:`~lit_echo.envs.base.EnvSpec`). The steps are sent to all workers at once and the
  replies awaited with :func:`multiprocessing.connection.wait` until the deadline; a worker that overruns is
  killed (SIGKILL to its session) and replaced. A worker is a fresh interpreter (``python -m
  lit_echo.online.env_worker``, safe after CUDA or threads have started in the trainer) that imports only itself
  and the environment, never the trainer's main script or torch; requests and replies are pickled over a socket
  pair with :class:`multiprocessing.connection.Connection`. Workers die with the trainer: on Linux they ask the
  kernel for SIGKILL when their parent exits (``PR_SET_PDEATHSIG``), so a SIGTERM'ed or killed run leaves nothing
  behind. (The kernel ties that to the thread that started the worker: the generator starts workers from the
  thread that calls it, normally the main thread, which lives as long as the run.) POSIX only.

Why not ``concurrent.futures.ProcessPoolExecutor``: an environment instance is stateful and must stay in one
process across a whole episode, and a pool can neither pin work to a worker nor kill one worker that hangs. Why
not ``multiprocessing.Process``: its ``spawn`` start re-imports the trainer's main module in every worker (for
``lit-echo``, Lightning and torch), and its ``forkserver`` workers are children of the fork server, which waits
for them, so they could not die with the trainer.

Lifetimes: this module provides the mechanisms (:meth:`ProcessEnv.close`/:meth:`ProcessEnv.kill`,
:func:`close_quietly`, :func:`close_after`); the owners decide when. A :class:`ProcessEnv` cleans up after itself
only when its own construction fails. Everything built after that is owned by the
:class:`~lit_echo.online.generator.GroupGenerator` that built it (it retires timed-out or dead instances and
closes the rest in ``close()``), and the generators by the data module that built them (closed when a data loader
is rebuilt, at teardown and on an exception).
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lit_echo.envs.base import Environment, EnvSpec, StepResult, truncate_observation

log = logging.getLogger(__name__)

FLOAT32_MAX = 3.4028234663852886e38  # rewards beyond this cannot be stored or trained on in float32
MAX_TASK_TYPE_CHARS = 200  # info["task_type"] becomes a metric name
_MESSAGE_CHARS = 500  # an error message shown to the policy is cut here (an exception's text can be huge)
_CLOSE_WAIT_S = 5.0  # how long teardown waits for environments' close()


class BadStepResult(ValueError):
    """An environment's ``step`` returned something the generator cannot use; the message says what."""


class WorkerError(RuntimeError):
    """A worker process could not do what it was asked (construction or ``reset`` raised there, or the worker
    died); ``detail`` is the worker's own account (``"Type: message"`` of the exception, or how it died)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


@dataclass
class StepFailure:
    """A step that raised, returned something unusable, or overran its time limit; ``message`` is the harness
    text shown to the policy (and stored as the rollout's ``env_error``).

    ``running``: thread mode, a step over the limit: the thread still running it (the instance must not be
    closed under it; see :func:`close_after`). Not part of equality."""

    message: str
    timed_out: bool = False
    running: threading.Thread | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------- checking returns
def _text(value: Any, field: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        expected = "str or None" if optional else "str"
        raise BadStepResult(f"{field} is {type(value).__name__}, expected {expected}")
    return value


def _valid_unicode(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: no tokenizer or JSON writer accepts them
        raise BadStepResult(f"{field} is not valid Unicode ({err.reason} at index {err.start})") from None


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def _flag(value: Any, field: str) -> bool:
    # bool, numpy's bool and the integers 0/1 are flags; anything else (None, "yes", 2, 0.5) is a bug to report.
    if _is_bool(value) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    shown = repr(value) if isinstance(value, (str, float)) and len(repr(value)) <= 40 else (
        str(value) if isinstance(value, int) and abs(value) < 10**30 else "a value")
    raise BadStepResult(f"{field} is {shown} ({type(value).__name__}), expected a bool")


def check_reward(value: Any, field: str = "reward") -> float:
    """``value`` as a float if it is a real number (not a bool) that is finite and within float32 range."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise BadStepResult(f"{field} is {type(value).__name__}, expected a real number (int or float; "
                            "not bool: return 1.0 or 0.0)")
    try:
        reward = float(value)
    except (OverflowError, ValueError):  # an int or a Fraction too large for a float
        size = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else \
            f"a {type(value).__name__} with {int(math.log10(abs(int(value)))) + 1} digits"
        raise BadStepResult(f"{field} is {size}, beyond float32 range") from None
    if not math.isfinite(reward):
        raise BadStepResult(f"{field} is {reward}, expected a finite number")
    if abs(reward) > FLOAT32_MAX:
        raise BadStepResult(f"{field} is {reward:g}, beyond float32 range (|r| <= {FLOAT32_MAX:.4g})")
    return reward


def check_step_result(result: Any, max_observation_chars: int | None = None) -> StepResult:
    """A clean copy of what ``step`` returned, or :class:`BadStepResult` naming the first thing wrong.

    Checks the contract of :mod:`lit_echo.envs.base`: a :class:`StepResult` whose ``observation`` is a str,
    ``warning`` a str or None, ``reward`` a finite real within float32 range (not a bool), ``done`` a bool (or
    0/1), ``info`` a dict whose ``success``/``valid_action`` are bools and ``task_type`` a short str, text valid
    Unicode. Observation and warning are cut at ``max_observation_chars`` (None: not cut) before the Unicode
    check, so a huge text costs no more than its cut.
    """
    if not isinstance(result, StepResult):
        raise BadStepResult(f"step returned {type(result).__name__}, expected lit_echo.envs.base.StepResult")
    observation = _text(result.observation, "observation")
    warning = _text(result.warning, "warning", optional=True)
    if max_observation_chars is not None:
        observation = truncate_observation(observation, max_observation_chars)
        warning = None if warning is None else truncate_observation(warning, max_observation_chars)
    _valid_unicode(observation, "observation")
    if warning is not None:
        _valid_unicode(warning, "warning")
    reward = check_reward(result.reward)
    done = _flag(result.done, "done")
    if not isinstance(result.info, dict):
        raise BadStepResult(f"info is {type(result.info).__name__}, expected dict")
    info = dict(result.info)
    for key in ("success", "valid_action"):
        if key in info:
            info[key] = _flag(info[key], f"info[{key!r}]")
    if "task_type" in info:
        task_type = _text(info["task_type"], "info['task_type']")
        if not 0 < len(task_type) <= MAX_TASK_TYPE_CHARS:
            raise BadStepResult(f"info['task_type'] has {len(task_type)} characters, expected 1 to "
                                f"{MAX_TASK_TYPE_CHARS}")
        _valid_unicode(task_type, "info['task_type']")
    return StepResult(observation, warning, reward, done, info)


# ---------------------------------------------------------------------------------------------- one guarded step
@functools.cache
def accepts_truncated(env_type: type) -> bool:
    """Whether ``env_type.step`` takes a ``truncated`` keyword (checked once per class)."""
    try:
        parameters = inspect.signature(env_type.step).parameters
    except (TypeError, ValueError):
        return False
    return "truncated" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _describe(err: BaseException) -> str:
    """``"Type: message"``, cut to a few hundred characters and made valid Unicode (the text is tokenized as a
    warning and written to JSON, so a lone surrogate in an exception's message must not get through)."""
    try:
        text = f"{type(err).__name__}: {err}"
    except Exception:  # an exception whose __str__ itself fails
        text = type(err).__name__
    text = text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def guarded_step(env: Environment, action: str, truncated: bool = False,
                 max_observation_chars: int | None = None) -> StepResult | StepFailure:
    """``env.step`` with its return checked and cut (:func:`check_step_result`); any failure as a value."""
    try:
        if truncated and accepts_truncated(type(env)):
            result = env.step(action, truncated=True)
        else:
            result = env.step(action)
        return check_step_result(result, max_observation_chars)
    except BadStepResult as err:
        return StepFailure(f"[environment error: invalid step result: {_describe(err).partition(': ')[2]}]")
    except Exception as err:  # any environment bug becomes a failed rollout, not a failed run
        return StepFailure(f"[environment error: {_describe(err)}]")


def _timeout_failure(timeout_s: float | None, running: threading.Thread | None = None) -> StepFailure:
    return StepFailure(f"[environment error: step timed out after {timeout_s:g} s]", timed_out=True,
                       running=running)


# ---------------------------------------------------------------------------------------------- thread isolation
def _step_in_threads(envs: Sequence[Environment], actions: Sequence[str], truncated: Sequence[bool],
                     timeout_s: float | None, max_observation_chars: int | None) -> list[StepResult | StepFailure]:
    results: list[StepResult | StepFailure | None] = [None] * len(envs)

    def run(i: int) -> None:
        results[i] = guarded_step(envs[i], actions[i], truncated[i], max_observation_chars)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"env-step-{i}") for i in range(len(envs))]
    for thread in threads:
        thread.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out: list[StepResult | StepFailure] = []
    for i, thread in enumerate(threads):
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        # A new list: a straggler that finishes later writes only into ``results``, never into what we return.
        result = results[i]
        if thread.is_alive():
            out.append(_timeout_failure(timeout_s, running=thread))
        else:
            out.append(_timeout_failure(timeout_s) if result is None else result)
    return out


# ---------------------------------------------------------------------------------------------- process isolation
def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent exits, even while it is stuck in C code."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def serve(fd: int, parent_pid: int) -> None:
    """The worker process (``python -m lit_echo.online.env_worker FD PPID``): receive the trainer's ``sys.path``
    and the pickled factory over the socket ``fd``, build one environment, then answer ``reset``/``step``/``close``
    requests until EOF."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which then closes its workers
    conn = multiprocessing.connection.Connection(fd)
    sys_path, payload = conn.recv()
    sys.path[:] = sys_path  # import the environment's module exactly as the trainer would
    try:
        env = pickle.loads(payload)()
    except BaseException as err:
        conn.send(("error", _describe(err)))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return
        if method == "step":
            value: Any = guarded_step(env, *args)
        else:
            try:
                value = env.reset(args) if method == "reset" else getattr(env, "close", lambda: None)()
            except BaseException as err:
                conn.send(("error", _describe(err)))
                continue
        try:
            conn.send(("ok", value))
        except Exception as err:  # unpicklable (e.g. a generator in info): the step fails, the worker lives on
            conn.send(("ok", StepFailure(f"[environment error: cannot send the step's result from the worker "
                                         f"process: {_describe(err)}]")) if method == "step"
                      else ("error", f"cannot send the result of {method} from the worker process: {_describe(err)}"))
        if method == "close":
            return


def env_name(env: Any) -> str:
    """The environment's class name (the wrapped class for a :class:`ProcessEnv`)."""
    return env.name if isinstance(env, ProcessEnv) else type(env).__name__


class ProcessEnv:
    """One environment instance in its own worker process; ``reset``/``step``/``close`` are calls to it.

    ``factory``: a picklable zero-argument callable that builds the instance (an :class:`EnvSpec`, an importable
    class, or ``functools.partial`` of one). A subclass of :class:`EnvSpec` that keeps its ``__call__`` (such as
    the data module's ``EnvEntry``) is sent as the plain :class:`EnvSpec` it amounts to, so the worker does not
    import the subclass's module (for ``EnvEntry``: the data module, torch and Lightning, seconds per worker).
    Construction errors are raised here (:class:`WorkerError`). ``timeout_s``: time limit of construction,
    ``reset`` and ``step`` (None: none); on timeout the worker is killed and ``TimeoutError`` raised
    (``step_all`` turns it into a :class:`StepFailure` instead).

    Lifetime: the instance owns its worker. Whatever goes wrong while the worker starts (it fails to start,
    exits before reading its factory, fails to build the environment, overruns, or the wait is interrupted), the
    worker is killed, reaped and its socket closed before the error propagates, so a failed construction leaves
    nothing behind. After that, :meth:`close` (or :meth:`kill`) ends it; its owner (the generator) calls it.
    """

    def __init__(self, factory: Callable[[], Environment], timeout_s: float | None = None):
        if isinstance(factory, EnvSpec) and type(factory) is not EnvSpec and \
                type(factory).__call__ is EnvSpec.__call__:
            factory = EnvSpec(factory.class_path, factory.kwargs, factory.name, factory.option)
        try:
            payload = pickle.dumps(factory)
        except Exception as err:
            raise TypeError(f"env_isolation='process' builds environments in worker processes from a picklable "
                            f"factory (lit_echo.envs.base.EnvSpec(class_path, kwargs), an importable class, or "
                            f"functools.partial of one); {factory!r} cannot be pickled: {_describe(err)}") from err
        self.name = factory.name if isinstance(factory, EnvSpec) else getattr(factory, "__name__", None) or \
            getattr(getattr(factory, "func", None), "__name__", type(factory).__name__)
        self.timeout_s = timeout_s
        ours, theirs = socket.socketpair()
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            # A fresh interpreter that imports only the worker module and the environment's (not the trainer's
            # main script, as multiprocessing's spawn would); its own session, so a kill reaches whatever it
            # started.
            self.process = subprocess.Popen([sys.executable, "-m", "lit_echo.online.env_worker",
                                             str(theirs.fileno()), str(os.getpid())], pass_fds=[theirs.fileno()],
                                            stdin=subprocess.DEVNULL, env=environ, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker holds the only copy: its death is an EOF here
        self.conn = multiprocessing.connection.Connection(ours.detach())
        try:
            try:
                self.conn.send((list(sys.path), payload))
            except OSError as err:  # it exited (or never ran Python) before reading its factory
                self.kill()
                detail = f"its worker process exited at start-up (exit code {self.process.returncode})"
                raise WorkerError(f"{self.name} construction failed: {detail} ({_describe(err)})", detail) from None
            self._call_result(timeout_s, "construction")
        except BaseException:
            self.kill()  # whatever the failure (an error reply, a timeout, Ctrl-C while waiting): nothing left
            raise

    # -- requests ---------------------------------------------------------------------------------------------
    def send(self, method: str, args: Any) -> None:
        self.conn.send((method, args))

    def receive(self, timeout_s: float | None) -> tuple[str, Any]:
        """The worker's next reply; ``("dead", message)`` if it exited, ``("timeout", None)`` if none came."""
        if not multiprocessing.connection.wait([self.conn], timeout_s):
            return "timeout", None
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            try:
                code = self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                code = None
            return "dead", f"worker process died (exit code {code})"

    def _call_result(self, timeout_s: float | None, what: str) -> Any:
        status, value = self.receive(timeout_s)
        if status == "ok":
            return value
        if status == "timeout":
            self.kill()
            raise TimeoutError(f"{self.name} {what} timed out after {timeout_s:g} s; its worker process was killed")
        self.kill()
        raise WorkerError(f"{self.name} {what} failed in its worker process: {value}", value)

    def reset(self, seed: int) -> list[dict[str, str]]:
        self._send_or_fail("reset", seed)
        return self._call_result(self.timeout_s, f"reset({seed})")

    def step(self, action: str, truncated: bool = False) -> StepResult:
        """One step on its own (``step_all`` is the batched, failure-as-value path)."""
        (result,) = step_all([self], [action], self.timeout_s, truncated=[truncated])
        if isinstance(result, StepFailure):
            raise RuntimeError(result.message)
        return result

    def _send_or_fail(self, method: str, args: Any) -> None:
        try:
            self.send(method, args)
        except (BrokenPipeError, OSError) as err:
            self.kill()
            detail = f"its worker process is gone ({_describe(err)})"
            raise WorkerError(f"{self.name}: {detail}", detail) from None

    # -- lifetime ---------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and its process group (whatever it was doing), then reap it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            log.warning("%s: worker process %d did not exit after SIGKILL", self.name, self.process.pid)
        if not self.conn.closed:
            self.conn.close()

    def close(self, timeout_s: float = _CLOSE_WAIT_S) -> None:
        """Let the instance run its own ``close()`` (for up to ``timeout_s``), then end the worker. Idempotent."""
        if self.conn.closed:
            return
        if self.alive:
            try:
                self.send("close", None)
                status, value = self.receive(timeout_s)
                if status == "error":
                    log.warning("%s.close() failed in its worker process: %s", self.name, value)
            except (BrokenPipeError, OSError):
                pass
        self.kill()


def _step_in_processes(envs: Sequence[ProcessEnv], actions: Sequence[str], truncated: Sequence[bool],
                       timeout_s: float | None, max_observation_chars: int | None) -> list[StepResult | StepFailure]:
    results: list[StepResult | StepFailure | None] = [None] * len(envs)
    pending: dict[int, ProcessEnv] = {}
    for i, env in enumerate(envs):
        try:
            env.send("step", (actions[i], truncated[i], max_observation_chars))
            pending[i] = env
        except (BrokenPipeError, OSError) as err:
            results[i] = StepFailure(f"[environment error: worker process is gone ({_describe(err)})]")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if not multiprocessing.connection.wait([env.conn for env in pending.values()], left):
                break
            for i, env in list(pending.items()):
                status, value = env.receive(0)
                if status == "timeout":
                    continue
                del pending[i]
                if status == "ok":
                    results[i] = value
                else:
                    env.kill()
                    results[i] = StepFailure(f"[environment error: {value}]")
    finally:  # past the deadline, or interrupted (SIGTERM, Ctrl-C): stop every worker still stepping
        for i, env in pending.items():
            env.kill()
            results[i] = _timeout_failure(timeout_s)
    return [r if r is not None else _timeout_failure(timeout_s) for r in results]


# ---------------------------------------------------------------------------------------------- both
def step_all(envs: Sequence[Environment], actions: Sequence[str], timeout_s: float | None, *,
             truncated: Sequence[bool] | None = None, max_observation_chars: int | None = None
             ) -> list[StepResult | StepFailure]:
    """``env.step(action)`` for each pair, concurrently, within one shared deadline.

    ``envs``: all :class:`ProcessEnv` (process isolation) or all in-process instances (one daemon thread
    each). Concurrency bounds the wall time of a turn by the slowest environment instead of the sum.
    ``truncated``: per env, the turn was cut at the token limit (passed as ``step(action, truncated=True)`` to
    environments whose ``step`` takes it). ``max_observation_chars``: observations and warnings are cut there
    inside the guarded region.

    Returns one entry per env: its checked :class:`StepResult`, or a :class:`StepFailure` when ``step`` raised,
    returned something the contract does not allow, or did not finish within ``timeout_s`` seconds (None: no
    limit). In process mode a worker that overran has been killed; in thread mode the step may still be running.
    """
    if len(envs) != len(actions):
        raise ValueError(f"step_all: {len(envs)} environments but {len(actions)} actions")
    truncated = [False] * len(envs) if truncated is None else list(truncated)
    if len(truncated) != len(envs):
        raise ValueError(f"step_all: {len(envs)} environments but {len(truncated)} truncated flags")
    in_processes = [isinstance(env, ProcessEnv) for env in envs]
    if any(in_processes) and not all(in_processes):
        raise ValueError("step_all: mix of ProcessEnv and in-process environments")
    run = _step_in_processes if all(in_processes) and envs else _step_in_threads
    return run(envs, actions, truncated, timeout_s, max_observation_chars)


def close_quietly(envs: Sequence[Any], timeout_s: float = _CLOSE_WAIT_S) -> None:
    """Call ``close()`` on each instance that has one, each in a daemon thread, waiting at most ``timeout_s``
    in all; errors are logged. A ``close`` that hangs is left behind rather than hanging the trainer."""
    closers = [env for env in envs if callable(getattr(env, "close", None))]

    def run(env: Any) -> None:
        try:
            env.close()
        except Exception as err:
            log.warning("%s.close() failed: %s", env_name(env), _describe(err))

    threads = [threading.Thread(target=run, args=(env,), daemon=True, name="env-close") for env in closers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def close_after(env: Any, running: threading.Thread | None, timeout_s: float = _CLOSE_WAIT_S) -> None:
    """Close a retired instance (as :func:`close_quietly`) once nothing runs in it any more.

    ``running``: the thread still running the instance's last step (thread mode, a step over its time limit), or
    None. Without one, or once it has finished, the instance is closed now. Otherwise a daemon thread
    (``env-retire``) waits for that step to return and then closes it: closing an instance under a step that is
    still running could corrupt it or race with it. A step that never returns keeps its instance open (and that
    thread waiting) until the process exits; Python cannot stop a thread.
    """
    if running is None or not running.is_alive():
        close_quietly([env], timeout_s)
        return

    def close_when_done() -> None:
        running.join()
        close_quietly([env], timeout_s)

    threading.Thread(target=close_when_done, daemon=True, name="env-retire").start()
