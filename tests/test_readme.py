"""The README's Python snippets run as written, and its two commands are the ones CI runs."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_python_snippet_runs(index, tmp_path):
    os.chdir(REPO)
    scope: dict = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), scope)
    if "GuessNumber" in scope:  # the environment example must satisfy the protocol and play a short episode
        from lit_echo.envs.base import Environment

        env = scope["GuessNumber"]()
        assert isinstance(env, Environment)
        opening = env.reset(41)
        assert opening[-1]["role"] == "user"
        assert env.step("hello").warning and env.step("42").done


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci" / "run").read_text()
    assert any("lit-echo fit --config configs/demo.yaml" in c for c in commands)
