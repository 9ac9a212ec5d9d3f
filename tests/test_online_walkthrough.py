"""The README's "Your own environment" walk-through, run as written: the GuessNumber example, the neutral
recipe on the tiny model (outputs under default_root_dir), a weighted mixture with per-task metrics, and your
own agent loop as the generator."""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
from pathlib import Path

import pytest

from lit_echo.chat import role_spans_text
from lit_echo.envs.examples import GuessNumber
from lit_echo.pretrained import load_tokenizer
from lit_echo.roles import Role
from lit_echo.rollout import Rollout

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("### Your own environment"):README.index("## Data")]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SECTION, flags=re.DOTALL)


def _scalar_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in log_dir.glob("**/events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags.update(events.Tags()["scalars"])
    return tags


def test_readme_environment_is_the_shipped_example():
    shown = next(block for block in _blocks("python") if "class GuessNumber" in block)
    assert inspect.getsource(GuessNumber) in shown


@pytest.mark.slow
def test_readme_walkthrough_commands_run_on_the_tiny_model(tmp_path, monkeypatch):
    from lit_echo.cli import run

    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs/online.yaml", tmp_path / "configs/online.yaml")
    (tmp_path / "mix.yaml").write_text(_blocks("yaml")[0])
    monkeypatch.chdir(tmp_path)
    commands = [c.strip() for c in _blocks("bash") if "tiny-random" in c]
    assert len(commands) == 2
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "lit-echo"
        run(args[1:])
        root = tmp_path / args[args.index("--trainer.default_root_dir") + 1]
        stored = [Rollout.from_json(line) for line in (root / "rollouts/rollouts-rank0.jsonl").read_text().splitlines()]
        assert [r.metadata["train_step"] for r in stored] == [0, 0, 1, 1]
        assert (root / "adapter/adapter_config.json").exists()
        tags = _scalar_tags(root / "lightning_logs")
        assert {"rollout/success_rate", "val/rollout/success_rate", "perf/gen_tokens_per_s"} <= tags
        task_types = {r.metadata["task_type"] for r in stored}
        assert {f"rollout/{t}/success_rate" for t in task_types} <= tags
        if "mix.yaml" in command:
            assert {r.metadata["env"] for r in stored} <= {"guess10", "guess100"}
            assert all(r.group_id.startswith(r.metadata["env"] + "-seed") for r in stored)
        else:
            assert task_types == {"guess-1-100"}


def test_readme_agent_loop_trains_and_stores_like_the_built_in_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = next(block for block in _blocks("python") if "def lookup_agent" in block)
    scope: dict = {}
    exec(compile(snippet, "README.md agent snippet", "exec"), scope)
    data = scope["data"]
    assert data.groups_trained == 2
    path = tmp_path / "runs/lookup-agent/rollouts/rollouts-rank0.jsonl"
    stored = [Rollout.from_json(line) for line in path.read_text().splitlines()]
    assert [r.group_id for r in stored] == ["agent-seed0"] * 2 + ["agent-seed1"] * 2
    assert [r.metadata["train_step"] for r in stored] == [0, 0, 1, 1]
    assert all(r.advantage is not None and isinstance(r.policy_version, int) for r in stored)
    # Exact roles: the tool's answer is the OBSERVATION, computed from the decoded first ACTION; both ACTION turns
    # carry sampling log-probs.
    tokenizer = load_tokenizer("tiny-random")
    ages = scope["AGES"]
    for rollout in stored:
        spans = [(role, text) for role, text in role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
                 if role != Role.CONTEXT]
        assert [role for role, _ in spans] == [Role.ACTION, Role.OBSERVATION, Role.ACTION]
        query = spans[0][1].removesuffix("<|im_end|>")
        assert spans[1][1] == ages.get(query.strip().lower(), "unknown name")
        actions = [i for i, role in enumerate(rollout.roles) if role == Role.ACTION]
        assert all(rollout.logprobs[i] is not None and rollout.logprobs[i] <= 0 for i in actions)
        assert rollout.metadata["turns"] == 2 and rollout.metadata["env"] == "agent"
    # Nothing was sampled for a third step that never runs (Lightning's look-ahead ends the stream), so nothing
    # is set aside.
    assert not Path(f"{path}.untrained").exists() and data.groups_generated == 2


def test_agent_loop_errors_name_the_agent(tiny_checkpoint):
    from lit_echo.online.agent import run_agent
    from lit_echo.tiny import build_tiny_model

    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = build_tiny_model(len(tokenizer))

    def short(model, tokenizer, seed, group_size, temperature):
        return []

    with pytest.raises(ValueError, match="agent .*short returned 0 rollouts for seed 3; expected group_size=2"):
        run_agent(short, model, tokenizer, seed=3, group_size=2, temperature=1.0, group_id="g", policy_version=0)

    def untracked(model, tokenizer, seed, group_size, temperature):
        return [Rollout(input_ids=[1, 2], roles=[0, int(Role.ACTION)], reward=0.0)]

    with pytest.raises(ValueError, match="ACTION tokens without sampling log-probs"):
        run_agent(untracked, model, tokenizer, seed=3, group_size=1, temperature=1.0, group_id="g",
                  policy_version=0)
