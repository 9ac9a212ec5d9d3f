"""The scripted ShellWorld expert: solves every task type through real env steps; its records and CLI output."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from lit_echo.envs.shellworld import HELDOUT_TASK_TYPES, TRAIN_TASK_TYPES, ShellWorld
from lit_echo.envs.shellworld.expert import SOLVERS, expert_rollout, main

_CMD = re.compile(r"<cmd>.*?</cmd>", re.DOTALL)


def test_every_task_type_has_a_solver():
    assert set(SOLVERS) == set(TRAIN_TASK_TYPES) | set(HELDOUT_TASK_TYPES)


@pytest.mark.parametrize("split", ["train", "heldout_trees", "heldout_tasks"])
def test_expert_solves_every_seed(split):
    env = ShellWorld(split)
    for seed in range(100):
        record = expert_rollout(env, seed)
        assert record["reward"] == 1.0, (split, seed, record["messages"])
        assert record["group_id"] == f"shellworld-{split}-{seed}"
        assert record["metadata"] == {"task_type": env.task.type, "seed": seed, "split": split, "expert": True}
        turns = record["messages"][2:]
        assert 4 <= len(turns) <= 6  # 2-3 assistant turns, each followed by its tool message
        assert [m["role"] for m in turns] == ["assistant", "tool"] * (len(turns) // 2)
        assert all(len(_CMD.findall(m["content"])) == 1 for m in turns if m["role"] == "assistant")
        assert all("warning" not in m for m in turns)
        assert json.loads(json.dumps(record, ensure_ascii=False)) == record


def test_expert_observations_are_genuine():
    """Replaying the expert's actions on a fresh env gives the same observations."""
    env = ShellWorld("train")
    record = expert_rollout(env, 4)
    env.reset(4)
    turns = record["messages"][2:]
    for action, tool in zip(turns[::2], turns[1::2]):
        assert env.step(action["content"]).observation == tool["content"]


def test_noise_inserts_warning_turns():
    env = ShellWorld("train")
    record = expert_rollout(env, 2, noise=1.0)
    warned = [m for m in record["messages"] if m["role"] == "tool" and "warning" in m]
    assert warned and all(m["warning"].startswith("WARNING:") and m["content"] == "" for m in warned)
    assert record["reward"] == 1.0
    assert expert_rollout(env, 2, noise=1.0) == record


@pytest.mark.parametrize("name", ["expert.jsonl", "expert.jsonl.gz"])
def test_cli_writes_records(tmp_path, name, capsys):
    out = tmp_path / "sub" / name
    main(["--split", "heldout_tasks", "--seeds", "0:6", "--out", str(out)])
    opener = gzip.open if name.endswith(".gz") else open
    with opener(out, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["metadata"]["seed"] for r in records] == list(range(6))
    assert records[0] == expert_rollout(ShellWorld("heldout_tasks"), 0)
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind
    assert "wrote 6 rollouts" in capsys.readouterr().out


def test_record_tokenizes_with_body_roles(tiny_tokenizer):
    """An expert record loads through the offline buffer's parser: tool bodies are OBSERVATION, warnings WARNING."""
    from lit_echo.chat import role_spans_text
    from lit_echo.data.records import parse_record
    from lit_echo.roles import Role

    record = expert_rollout(ShellWorld("train"), 2, noise=1.0)
    rollout = parse_record(json.dumps(record, ensure_ascii=False), tokenizer=tiny_tokenizer)
    spans = role_spans_text(tiny_tokenizer, rollout.input_ids, rollout.roles)
    tools = [m for m in record["messages"] if m["role"] == "tool"]
    assert [t for r, t in spans if r == Role.OBSERVATION] == [m["content"] for m in tools if m["content"]]
    assert [t for r, t in spans if r == Role.WARNING] == [m["warning"] for m in tools if "warning" in m]
    assert rollout.reward == 1.0 and rollout.group_id == "shellworld-train-2"


def test_observations_are_cut_like_the_generator_cuts_them():
    from lit_echo.envs.base import truncate_observation

    full = expert_rollout(ShellWorld("train"), 1)
    cut = expert_rollout(ShellWorld("train"), 1, max_observation_chars=12)
    full_tools = [m["content"] for m in full["messages"] if m["role"] == "tool"]
    cut_tools = [m["content"] for m in cut["messages"] if m["role"] == "tool"]
    assert cut_tools[0] == truncate_observation(full_tools[0], 12) != full_tools[0]


def test_old_module_path_still_works():
    import subprocess
    import sys

    from lit_echo.envs import expert as old

    assert old.expert_rollout is expert_rollout
    out = subprocess.run([sys.executable, "-m", "lit_echo.envs.expert", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-observation-chars" in out.stdout
