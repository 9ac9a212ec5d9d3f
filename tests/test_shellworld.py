"""ShellWorld: shell commands against hand-written GNU-style outputs, the <cmd> turn format, splits, determinism."""

from __future__ import annotations

import re

import pytest

from lit_echo.envs.base import Environment
from lit_echo.envs.shellworld import HELDOUT_TASK_TYPES, TRAIN_TASK_TYPES, FileSystem, Shell, ShellWorld, answer_matches
from lit_echo.envs.shellworld.env import NO_COMMAND_WARNING

TREE = {
    "README.md": "# Demo\nhello world\n",
    "notes.txt": "b\na\nb\nb\nc\na\n",
    "logs": {
        "app.log": "INFO start\nERROR db down\nWARN slow\nerror lower\nINFO done\n",
        "archive": {"old.log": "INFO old\n", "old.log.1": "x\n"},
    },
    "data": {"users.csv": "id,name,dept,score\n1,ann,eng,30\n2,bob,ops,120\n3,cy,eng,9\n4,dee,ops,120\n"},
}


@pytest.fixture
def shell() -> Shell:
    return Shell(FileSystem(TREE))


CASES = [
    # ls: one name per line, C-locale order (uppercase first)
    ("ls", "README.md\ndata\nlogs\nnotes.txt\n"),
    ("ls logs", "app.log\narchive\n"),
    ("ls logs data", "data:\nusers.csv\n\nlogs:\napp.log\narchive\n"),
    ("ls logs/*.log", "logs/app.log\n"),
    ("ls -R logs", "logs:\napp.log\narchive\n\nlogs/archive:\nold.log\nold.log.1\n"),
    ("ls -d logs data", "data\nlogs\n"),
    ("ls nope", "ls: cannot access 'nope': No such file or directory\n"),
    ("ls -z", "ls: invalid option -- 'z'\nTry 'ls --help' for more information.\n"),
    # cat
    ("cat notes.txt", "b\na\nb\nb\nc\na\n"),
    ("cat nofile", "cat: nofile: No such file or directory\n"),
    ("cat logs", "cat: logs: Is a directory\n"),
    ("cat *.xyz", "cat: *.xyz: No such file or directory\n"),  # an unmatched glob stays literal
    # head / tail
    ("head -n 2 notes.txt", "b\na\n"),
    ("head -2 notes.txt", "b\na\n"),
    ("tail -n 2 notes.txt", "c\na\n"),
    ("tail -1 notes.txt", "a\n"),
    ("tail -n +5 notes.txt", "c\na\n"),
    ("tail -n -2 notes.txt", "c\na\n"),
    ("head -n -4 notes.txt", "b\na\n"),
    ("head -n 1 README.md notes.txt", "==> README.md <==\n# Demo\n\n==> notes.txt <==\nb\n"),
    # grep
    ("grep -c ERROR logs/app.log", "1\n"),
    ("grep -ci error logs/app.log", "2\n"),
    ("grep -i error logs/app.log", "ERROR db down\nerror lower\n"),
    ("grep -v INFO logs/app.log", "ERROR db down\nWARN slow\nerror lower\n"),
    ("grep -n WARN logs/app.log", "3:WARN slow\n"),
    ("grep '^INFO' logs/app.log", "INFO start\nINFO done\n"),
    ("grep -E 'WARN|ERROR' logs/app.log", "ERROR db down\nWARN slow\n"),
    ("grep INFO logs/app.log logs/archive/old.log",
     "logs/app.log:INFO start\nlogs/app.log:INFO done\nlogs/archive/old.log:INFO old\n"),
    ("grep -c INFO logs/app.log README.md", "logs/app.log:2\nREADME.md:0\n"),
    ("grep x nofile", "grep: nofile: No such file or directory\n"),
    ("grep -rc INFO logs", "logs/app.log:2\nlogs/archive/old.log:1\nlogs/archive/old.log.1:0\n"),
    ("grep -rl old .", "./logs/archive/old.log\n"),
    # wc: one count of one input unpadded; otherwise width of the total size, 7 for pipes
    ("wc -l notes.txt", "6 notes.txt\n"),
    ("wc -w logs/app.log", "11 logs/app.log\n"),
    ("wc -c notes.txt", "12 notes.txt\n"),
    ("wc notes.txt", " 6  6 12 notes.txt\n"),
    ("cat notes.txt | wc -l", "6\n"),
    ("cat notes.txt | wc", "      6       6      12\n"),
    ("wc -l notes.txt README.md", " 6 notes.txt\n 2 README.md\n 8 total\n"),
    # find: depth-first, sorted
    ("find logs -name '*.log'", "logs/app.log\nlogs/archive/old.log\n"),
    ("find . -type d", ".\n./data\n./logs\n./logs/archive\n"),
    ("find logs -type f", "logs/app.log\nlogs/archive/old.log\nlogs/archive/old.log.1\n"),
    ("find nope", "find: 'nope': No such file or directory\n"),
    # sort: ties broken by the whole line, reversed too under -r (GNU)
    ("sort notes.txt", "a\na\nb\nb\nb\nc\n"),
    ("sort -r notes.txt", "c\nb\nb\nb\na\na\n"),
    ("sort -u notes.txt", "a\nb\nc\n"),
    ("tail -n +2 data/users.csv | sort -t, -k4 -n", "3,cy,eng,9\n1,ann,eng,30\n2,bob,ops,120\n4,dee,ops,120\n"),
    ("tail -n +2 data/users.csv | sort -t, -k4,4 -nr", "4,dee,ops,120\n2,bob,ops,120\n1,ann,eng,30\n3,cy,eng,9\n"),
    # uniq
    ("uniq notes.txt", "b\na\nb\nc\na\n"),
    ("sort notes.txt | uniq -c", "      2 a\n      3 b\n      1 c\n"),
    ("sort notes.txt | uniq -d", "a\nb\n"),
    # cut
    ("cut -d, -f2 data/users.csv", "name\nann\nbob\ncy\ndee\n"),
    ("cut -d, -f1,3 data/users.csv | head -n 2", "id,dept\n1,eng\n"),
    ("cut -d, -f3- data/users.csv | tail -n 1", "ops,120\n"),
    ("cut data/users.csv", "cut: you must specify a list of bytes, characters, or fields\n"
                           "Try 'cut --help' for more information.\n"),
    # echo, pipes, quoting, shell errors
    ("echo hello   world", "hello world\n"),
    ("echo 'a  b' \"c|d\"", "a  b c|d\n"),
    ("echo *.txt", "notes.txt\n"),
    ("cat logs/app.log | grep -i error | wc -l", "2\n"),
    ("foo bar", "bash: foo: command not found\n"),
    ("ls > out.txt", "bash: '>' is not supported here; only pipes (|) are available\n"),
    ("ls |", "bash: syntax error: unexpected end of file\n"),
    ("grep 'x", "bash: unexpected EOF while looking for matching '''\n"),
    # bash's backslash rules: kept inside single quotes, escaping only " \ $ ` inside double quotes
    (r"""echo "a\"b" "c\d" 'e\f' g\h""", "a\"b c\\d e\\f gh\n"),
    ("echo a'b'\"c\"d ~ x~", "abcd /home/user x~\n"),
    ('echo "a', "bash: unexpected EOF while looking for matching '\"'\n"),
    ("echo $HOME $(ls)", "bash: '$(' is not supported here; only pipes (|) are available\n"),
]


@pytest.mark.parametrize("command,expected", CASES, ids=[c for c, _ in CASES])
def test_command_output(shell, command, expected):
    assert shell.run(command) == expected


def test_ls_long(shell):
    out = re.sub(r"[A-Z][a-z]{2} [ 1-9]\d \d\d:\d\d", "MTIME", shell.run("ls -l logs"))
    assert out == ("total 8\n"
                   "-rw-r--r-- 1 user user   57 MTIME app.log\n"
                   "drwxr-xr-x 2 user user 4096 MTIME archive\n")
    assert shell.run("ls -l logs") == shell.run("ls -l logs")  # metadata is a function of the path


def test_cd_and_pwd(shell):
    assert shell.run("pwd") == "/home/user\n"
    assert shell.run("cd logs/archive") == ""
    assert shell.run("pwd") == "/home/user/logs/archive\n"
    assert shell.run("cat ../app.log | head -n 1") == "INFO start\n"
    assert shell.run("cd ../..") == "" and shell.run("pwd") == "/home/user\n"
    assert shell.run("cd nope") == "bash: cd: nope: No such file or directory\n"
    assert shell.run("cd notes.txt") == "bash: cd: notes.txt: Not a directory\n"
    shell.run("cd /")
    assert shell.run("ls") == "home\n"
    assert shell.run("cd") == "" and shell.run("pwd") == "/home/user\n"
    assert shell.run("cat ~/README.md | wc -l") == "2\n"


def _first_env(seed: int = 0, **kwargs) -> ShellWorld:
    env = ShellWorld(**kwargs)
    env.reset(seed)
    return env


def test_reset_messages_and_protocol():
    env = ShellWorld()
    assert isinstance(env, Environment)
    system, user = env.reset(3)
    assert system["role"] == "system" and user["role"] == "user"
    assert "<cmd>" in system["content"] and "<cmd>submit ANSWER</cmd>" in system["content"]
    assert user["content"] == env.task.question


def test_malformed_turns_warn():
    env = _first_env()
    result = env.step("I would list the files with `ls`.")
    assert result.warning == NO_COMMAND_WARNING and result.observation == ""
    assert result.info == {"success": False, "valid_action": False, "task_type": env.task.type, "turn": 1}
    assert not result.done and result.reward == 0.0
    two = env.step("<cmd>ls</cmd> then <cmd>pwd</cmd>")
    assert two.warning.startswith("WARNING: 2 commands found") and not two.info["valid_action"]
    assert env.step("<cmd>submit </cmd>").warning.startswith("WARNING: empty answer")
    ok = env.step("Look around.\n<cmd>ls</cmd>")
    assert ok.warning is None and ok.info["valid_action"] and ok.observation.startswith("README.md\n")


def test_submit_ends_the_episode():
    env = _first_env(5)
    win = env.step(f"The answer.\n<cmd>submit  {env.task.answer.upper()} </cmd>")
    assert (win.reward, win.done, win.info["success"], win.observation) == (1.0, True, True, "Correct.\n")
    with pytest.raises(RuntimeError):
        env.step("<cmd>ls</cmd>")
    env.reset(5)
    lose = env.step("<cmd>submit definitely wrong</cmd>")
    assert (lose.reward, lose.done, lose.info["success"]) == (0.0, True, False)
    env = _first_env()
    for turn in range(1, 21):  # no turn limit of its own: the generator's max_turns ends an episode
        result = env.step("<cmd>ls</cmd>")
        assert not result.done and result.info["turn"] == turn


def test_cut_turn_gets_its_own_warning():
    env = _first_env()
    cut = env.step("Let me count them with <cmd>grep -c ERR", truncated=True)
    assert cut.warning.startswith("WARNING: reply cut off at the token limit") and not cut.info["valid_action"]
    whole = env.step("<cmd>pwd</cmd>", truncated=True)  # a complete command in a cut turn still runs
    assert whole.warning is None and whole.observation == "/home/user\n"


def test_answer_matching():
    assert answer_matches(" 42.0 ", "42") and answer_matches("4,200", "4200")
    assert answer_matches("'Alice'.", "alice") and answer_matches("a   b", "A b")
    assert not answer_matches("41", "42") and not answer_matches("alic", "alice")


def _episode(split: str, seed: int) -> tuple[list, list[str]]:
    env = ShellWorld(split)
    messages = env.reset(seed)
    outputs = [env.step(f"<cmd>{c}</cmd>").observation for c in ("find . -type f", "ls -l logs", "cat README.md")]
    return messages, outputs


@pytest.mark.parametrize("split", ["train", "heldout_trees", "heldout_tasks"])
def test_determinism(split):
    assert _episode(split, 11) == _episode(split, 11)
    assert _episode(split, 11) != _episode(split, 12)


def test_splits_disjoint():
    seeds = range(40)

    def trees_and_types(split):
        env = ShellWorld(split)
        built = [env.build(seed) for seed in seeds]
        return {repr(world.tree) for world, _ in built}, {task.type for _, task in built}

    train_trees, train_types = trees_and_types("train")
    heldout_trees, heldout_tree_types = trees_and_types("heldout_trees")
    task_trees, task_types = trees_and_types("heldout_tasks")
    assert train_types == heldout_tree_types == set(TRAIN_TASK_TYPES)
    assert task_types == set(HELDOUT_TASK_TYPES) and not task_types & train_types
    assert not train_trees & heldout_trees and not train_trees & task_trees
    # held-out trees use other names: no training log file name appears in them
    train_logs = {name for t in train_trees for name in re.findall(r"'(\w+\.log)'", t)}
    assert not any(name in t for t in heldout_trees for name in train_logs - {"access.log"})


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        ShellWorld("test")
