"""The TextWorld adapter on a real game made offline with tw-make (skipped when textworld is not installed)."""

from __future__ import annotations

import pytest

textworld = pytest.importorskip("textworld")

from lit_echo import models  # noqa: E402  (after the skip: nothing to test without textworld)
from lit_echo.chat import role_spans_text  # noqa: E402
from lit_echo.envs.textworld import NO_CMD_WARNING, TextWorldEnv, clean_feedback, make_games  # noqa: E402
from lit_echo.online.generator import GroupGenerator, SamplingSettings  # noqa: E402
from lit_echo.roles import Role  # noqa: E402


@pytest.fixture(scope="module")
def game(tmp_path_factory):
    (path,) = make_games(tmp_path_factory.mktemp("tw"), games=1, seed=1, world_size=3, nb_objects=5,
                         quest_length=2)
    return path


def _walkthrough(path) -> list[str]:
    env = textworld.start(str(path), request_infos=textworld.EnvInfos(policy_commands=True))
    try:
        return list(env.reset().policy_commands)
    finally:
        env.close()


def test_walkthrough_wins_with_total_reward_one(game):
    env = TextWorldEnv(str(game.parent))
    opening = env.reset(0)
    assert [m["role"] for m in opening] == ["system", "user"]
    assert "$$" not in opening[1]["content"] and "objective" in opening[1]["content"].lower()
    total, result = 0.0, None
    for command in _walkthrough(game):
        result = env.step(command)
        assert result.info["valid_action"] and result.warning is None
        total += result.reward
    assert result.done and result.info["success"] and total == pytest.approx(1.0)
    assert not result.observation.rstrip().endswith("=-")  # prompt and status bar removed


def test_command_formats_and_invalid_commands(game):
    env = TextWorldEnv(str(game), command_format="cmd")
    env.reset(0)
    no_cmd = env.step("go east")
    assert no_cmd.warning == NO_CMD_WARNING and no_cmd.observation == "" and not no_cmd.info["valid_action"]
    nonsense = env.step("I try <cmd>xyzzy</cmd>")
    assert nonsense.warning is None and "not a verb" in nonsense.observation and not nonsense.info["valid_action"]
    look = env.step("<cmd>look</cmd>")
    assert not look.done and look.info["valid_action"] and look.reward == 0.0  # no turn limit of its own
    cut = env.step("<cmd>go ea", truncated=True)
    assert cut.warning.startswith("WARNING: reply cut off at the token limit") and cut.observation == ""


@pytest.mark.parametrize("command", ["save", "SAVE", "look. save", "look then restore", "script", "transcript on",
                                     "unscript", "recording on", "replay", "quit", "q", "die", "restart"])
def test_interpreter_commands_that_touch_files_or_end_the_session_never_reach_the_game(game, tmp_path,
                                                                                    monkeypatch, command):
    """The game interpreter writes save files and transcripts into the working directory (``save`` wrote
    ``<game>.qzl``, ``script`` a file named after the policy's next words): a warning instead, the game does not
    move, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    env = TextWorldEnv(str(game))
    env.reset(0)
    result = env.step(command)
    verb = command.split()[-1].lower() if command.startswith("look") else command.split()[0].lower()
    assert result.warning is not None and f"`{verb}`" in result.warning and result.observation == ""
    assert not result.info["valid_action"] and not result.done and result.reward == 0.0
    follow_up = env.step("my_saved_game")  # what a filename prompt would have taken
    assert "not a verb" in follow_up.observation
    assert list(tmp_path.iterdir()) == []
    assert env.step("look").info["valid_action"]


def test_control_characters_never_reach_the_game(game):
    """Commands a tiny random policy sampled: the interpreter spun forever on ``\\x13`` and ``\\x00`` (a step
    that never returned; two such games in threads crashed the process), and on its own backslash commands.
    Each control character and backslash is a space."""
    import threading

    env = TextWorldEnv(str(game))
    env.reset(0)
    results = {}

    def play():
        results["junk"] = env.step("\x13&\ufffd hellsME")
        results["nul"] = env.step("\x00look")
        results["only"] = env.step("\x13\x00 \x1f")
        results["help"] = env.step("\\help")
        results["backslash"] = env.step("\\s look")

    worker = threading.Thread(target=play, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a step with control characters never returned"
    assert "not a verb" in results["junk"].observation and not results["junk"].info["valid_action"]
    assert results["nul"].info["valid_action"] and results["nul"].observation  # the command "look"
    assert results["only"].warning is not None and results["only"].observation == ""
    assert results["help"].observation.startswith("Available commands")  # the game's "help", not the interpreter's
    assert "(go) s" in results["backslash"].observation  # the game parsed "s look" (s: go south)


def test_clean_feedback_strips_prompt_and_status_bar():
    assert clean_feedback("\n\nYou see a box.\n\n>          -= Studio =-0/2") == "You see a box.\n"


def test_generator_plays_textworld(game, tiny_checkpoint):
    tokenizer = models.load_tokenizer(str(tiny_checkpoint))
    model = models.build_model(str(tiny_checkpoint), lora_rank=4)
    generator = GroupGenerator(lambda: TextWorldEnv(str(game)), tokenizer,
                               SamplingSettings(max_new_tokens=6, max_turns=2))
    rollouts, stats = generator.generate_group(model, seed=0, group_size=2)
    assert stats.rollouts == 2 and stats.env_errors == 0
    for rollout in rollouts:
        assert rollout.metadata["turns"] == 2 and rollout.metadata["task_type"] == "textworld"
        spans = role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
        assert any(role in (Role.OBSERVATION, Role.WARNING) for role, _ in spans)
