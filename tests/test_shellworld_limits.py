"""ShellWorld is safe by construction: no command line can hang a step or take more than linear time to parse.

Each case runs in a fresh interpreter with a generous process-level timeout (tens of seconds) and asserts that
it *finished* and printed the expected text; speed itself is measured in benchmarks, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Enough for a healthy run on a loaded 2-core machine many times over; a catastrophic pattern on Python's ``re``
# (2**50 paths) or a quadratic 1 MB parse (over a minute) does not finish within it.
PROCESS_TIMEOUT_S = 60

_RUN_COMMAND = """
import json, sys
from lit_echo.envs.shellworld import ShellWorld
env = ShellWorld("train")
env.reset(0)
result = env.step(sys.stdin.read())
print(json.dumps({"observation": result.observation, "valid": result.info["valid_action"]}))
"""


def _step_in_subprocess(action: str) -> dict:
    """One ShellWorld step in a fresh interpreter; fails the test if it does not finish in time."""
    try:
        done = subprocess.run([sys.executable, "-c", _RUN_COMMAND], input=action, capture_output=True, text=True,
                              timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the step did not finish within {PROCESS_TIMEOUT_S} s: {action[:80]!r}...")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


LONG_LINE = "a" * 60  # a README/log line this long gives a backtracking engine 2**60 ways to fail


@pytest.mark.parametrize("pattern", ["(.*)*Z", "(a|aa)*Z", "(a*)*b", "(x+x+)+y", ".*.*.*.*.*.*.*.*.*.*.*Z"])
def test_catastrophic_grep_pattern_terminates(pattern):
    out = _step_in_subprocess(f"<cmd>echo {LONG_LINE} | grep -E '{pattern}'</cmd>")
    assert out["valid"]
    # Either the engine found the (empty) answer fast or the time limit stopped it with a grep error.
    assert out["observation"] in ("", "grep: regular expression too slow to match (time limit 2 s)\n")


def test_catastrophic_pattern_on_a_world_file_terminates():
    out = _step_in_subprocess("<cmd>grep -rE '(.*)*Z' .</cmd>")
    assert out["valid"] and "Z" not in out["observation"].replace("grep: regular expression", "")


@pytest.mark.parametrize("word,length", [("a" * 2_000_000, 2_000_000), ("a\\b" * 333_333, 666_666),
                                         ("'ab'" * 250_000, 500_000), ('"a\\"b"' * 200_000, 600_000)],
                         ids=["plain", "escapes", "single-quoted pieces", "double-quoted pieces"])
def test_one_megabyte_argument_parses_in_linear_time(word, length):
    out = _step_in_subprocess(f"<cmd>echo {word} | wc -c</cmd>")
    assert out["observation"] == f"{length + 1}\n"


def test_one_megabyte_bracket_pattern_terminates():
    out = _step_in_subprocess("<cmd>grep '" + "[:" * 500_000 + "' README.md</cmd>")
    assert out["valid"] and out["observation"].startswith("grep: ")


def test_many_unclosed_tags_parse_in_linear_time():
    out = _step_in_subprocess("<cmd>" * 200_000 + "ls")
    assert not out["valid"] and out["observation"] == ""


def test_time_limit_stops_a_pattern_the_engine_cannot_shortcut():
    out = _step_in_subprocess("<cmd>echo " + "x" * 3000 + " | grep -cE '(x+x+)+y'</cmd>")
    assert out["observation"] == "grep: regular expression too slow to match (time limit 2 s)\n"
