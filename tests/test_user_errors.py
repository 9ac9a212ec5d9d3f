"""Mistakes in the configuration or the input files end `lit-echo` with one line naming them (exit status 2);
LIT_ECHO_TRACEBACK=1 keeps the traceback; other errors keep theirs; class paths find modules in the working
directory."""

import subprocess
import sys
from pathlib import Path

import pytest

from lit_echo._checks import check_choice
from lit_echo.cli import main as cli_main
from lit_echo.user_errors import TRACEBACK_VARIABLE, report_user_errors, user_error_message

REPO = Path(__file__).resolve().parents[1]
ONLINE = ["fit", "--config", str(REPO / "configs/online.yaml"), "--model.model_name_or_path", "tiny-random",
          "--trainer.max_steps", "1", "--data.init_args.group_size", "2", "--data.init_args.max_turns", "1"]
TINY = ["fit", "--config", str(REPO / "configs/tiny.yaml")]


@pytest.fixture(autouse=True)
def _no_traceback_variable(monkeypatch):
    monkeypatch.delenv(TRACEBACK_VARIABLE, raising=False)


@pytest.mark.parametrize("args, expected", [
    # A data module's check: jsonargparse wraps it in "Does not validate against any of the Union subtypes".
    (ONLINE + ["--data.init_args.group_size", "0"], "data.group_size: expected >= 1, got 0"),
    # An environment's own error, wrapped by lit_echo with the options that built it.
    (ONLINE + ["--data.init_args.env_kwargs", "{level: 2}"],
     "data.env_class/data.env_kwargs: lit_echo.envs.examples.GuessNumber(**{'level': 2}) failed: TypeError: "
     "GuessNumber.__init__() got an unexpected keyword argument 'level'"),
    # The module names its bare argument; the command line says model.lr.
    (TINY + ["--model.lr", "0"], "model.lr: expected a value in (0, inf), got 0.0"),
    (TINY + ["--model.world_loss", "ce", "--model.world_coef", "-1"], "model.world_coef: expected a number >= 0"),
    # The offline data module checks its paths when built, before the model loads.
    (TINY + ["--data.train_path", "missing/train.jsonl"],
     f"data.train_path: no rollout files (.jsonl, .jsonl.gz) found at ['missing/train.jsonl']: expected files, a "
     f"directory holding them, or a glob (relative paths are resolved against the working directory {REPO})"),
    # Raised inside trainer.fit (the data module's setup), after the model was built.
    (ONLINE + ["--trainer.max_steps", "-1"], "trainer.max_steps is not set: the online stream is endless"),
    (["evaluate", "--adapter", "runs/no-such-adapter"], "--adapter='runs/no-such-adapter' (relative to the working "
                                                        f"directory {REPO}) does not exist"),
    (["evaluate", "--env-class", "no_such_module.Env"],
     "--env-class 'no_such_module.Env': cannot import module 'no_such_module'"),
], ids=["data-check", "env-constructor", "model-check", "loss-check", "offline-path", "fit-setup", "evaluate-adapter",
        "evaluate-env"])
def test_a_mistake_is_one_line_naming_it(args, expected, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    outputs = [f"--trainer.default_root_dir={tmp_path}"] if args[0] == "fit" else []
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args + outputs)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"lit-echo: error: {expected}" in err
    assert "Traceback" not in err and "Does not validate" not in err and "Given value" not in err
    assert err.rstrip().endswith(f"(set {TRACEBACK_VARIABLE}=1 for the traceback)")


def test_the_traceback_variable_keeps_the_exception(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(ValueError, match=r"^lr: expected a value in \(0, inf\)"):
        cli_main(TINY + ["--model.lr", "0"])


def _raise_here():
    raise ValueError("raised outside lit_echo")


def test_only_lit_echo_checks_count_as_mistakes():
    with pytest.raises(ValueError) as outside:
        _raise_here()
    assert user_error_message(outside.value) is None  # another library's ValueError keeps its traceback
    with pytest.raises(ValueError) as check:
        check_choice("data.backend", "tpu", ["hf", "vllm"])
    assert user_error_message(check.value) == "data.backend: expected one of hf, vllm, got 'tpu'"
    try:  # a wrapper outside the package (as jsonargparse's) is looked through to lit_echo's message
        try:
            check_choice("data.backend", "tpu", ["hf", "vllm"])
        except ValueError as err:
            raise ValueError("Does not validate against any of the Union subtypes") from err
    except ValueError as wrapped:
        assert user_error_message(wrapped) == "data.backend: expected one of hf, vllm, got 'tpu'"
    from lit_echo.chat import RolloutBuilder
    from lit_echo.pretrained import load_tokenizer

    builder = RolloutBuilder(load_tokenizer("tiny-random"), [{"role": "user", "content": "hi"}])
    with pytest.raises(RuntimeError) as misuse:  # an internal invariant: a bug, not a mistake in the input
        builder.add_observation("out of turn")
    assert user_error_message(misuse.value) is None
    with pytest.raises(RuntimeError, match="out of turn"), report_user_errors("prog"):
        raise RuntimeError("out of turn")


def test_the_command_finds_an_environment_in_the_working_directory(tmp_path):
    """The console script, as a user runs it: `my_env.py` in the working directory is importable as `my_env`
    (not on sys.path by default for an installed script). Its reset fails on purpose, so the run stops at the
    environment check, which could only call reset after importing the module."""
    (tmp_path / "my_env.py").write_text(
        "class Refuses:\n"
        "    def reset(self, seed):\n"
        "        raise ValueError('my env says no')\n"
        "    def step(self, action):\n"
        "        raise AssertionError('never reached')\n")
    script = Path(sys.executable).with_name("lit-echo")
    if not script.exists():
        pytest.skip("the lit-echo console script is not installed beside this Python (pip install -e .)")
    done = subprocess.run([str(script), *ONLINE, "--data.init_args.env_class", "my_env.Refuses",
                           "--data.init_args.env_kwargs", "{}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert ("lit-echo: error: data.env_class/data.env_kwargs: my_env.Refuses(**{}).reset(0) failed: ValueError: "
            "my env says no") in done.stderr
    assert "Traceback" not in done.stderr
