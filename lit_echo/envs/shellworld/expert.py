"""A scripted ShellWorld expert and a command line that writes its rollouts as an offline buffer.

The expert plays the environment for real: every command goes through ``env.step`` and the answer is computed
from the observations it got back (plus the question's own parameters, which the question text states), never
from the hidden answer. Each solver is a short script of 2-3 turns: optional one-sentence reasoning, then one
``<cmd>``. Works for every task type, held-out ones included.

Records use the messages form of the offline buffer (see :mod:`lit_echo.rollout`)::

    {"messages": [system, user, assistant, tool, ...], "reward": 1.0, "group_id": "shellworld-train-7",
     "metadata": {"task_type": ..., "seed": 7, "split": "train", "expert": true}}

Command line::

    python -m lit_echo.envs.shellworld.expert --split train --seeds 0:200 --out expert.jsonl.gz [--noise 0.1]

``--noise P`` inserts, with probability P before each turn, a malformed turn (no ``<cmd>``) so the buffer holds
WARNING examples; the warning comes back in the tool message's ``warning`` field. ``--max-turns`` and
``--max-observation-chars`` play the generator's limits (same meaning, same truncation notice), so offline and
online rollouts look alike.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shlex
import tempfile
from collections.abc import Callable, Generator
from typing import Any

from lit_echo.envs.base import truncate_observation
from lit_echo.envs.shellworld.env import ShellWorld
from lit_echo.envs.shellworld.tasks import parse_ini

# A solver yields assistant turns and receives each turn's observation; its last turn is a submit.
Solver = Callable[[dict[str, Any]], Generator[str, str, None]]


def _turn(reason: str, command: str) -> str:
    return f"{reason}\n<cmd>{command}</cmd>" if reason else f"<cmd>{command}</cmd>"


def _submit(answer: str) -> str:
    return _turn("", f"submit {answer}")


def _lines(observation: str) -> list[str]:
    return [line for line in observation.split("\n") if line]


def _column(header: str, name: str) -> int:
    return header.split(",").index(name) + 1


def _count_matches(p: dict) -> Generator[str, str, None]:
    out = yield _turn("Count the matching lines with grep.", f"grep -c {shlex.quote(p['keyword'])} {p['path']}")
    yield _submit(out.strip())


def _count_files(p: dict) -> Generator[str, str, None]:
    out = yield _turn(f"List the {p['ext']} files under {p['directory']}/.",
                      f"find {p['directory']} -type f -name '*{p['ext']}'")
    n = len(_lines(out))
    yield _turn(f"That is {n} files.", f"submit {n}")


def _config_value(p: dict) -> Generator[str, str, None]:
    out = yield _turn("Read the config file.", f"cat {p['path']}")
    value = parse_ini(out)[(p["section"], p["key"])]
    yield _turn(f"In [{p['section']}], {p['key']} is {value}.", f"submit {value}")


def _csv_extreme(p: dict) -> Generator[str, str, None]:
    header = yield _turn("Check the column order first.", f"head -n 1 {p['path']}")
    k = _column(header.strip(), p["column"])
    order = "-nr" if p["highest"] else "-n"
    row = yield _turn(f"{p['column']} is field {k}; sort on it.",
                      f"tail -n +2 {p['path']} | sort -t, -k{k},{k} {order} | head -n 1")
    name = row.strip().split(",")[_column(header.strip(), p["answer_column"]) - 1]
    yield _submit(name)


def _csv_sum(p: dict) -> Generator[str, str, None]:
    header = yield _turn("Check the column order first.", f"head -n 1 {p['path']}")
    k = _column(header.strip(), p["column"])
    out = yield _turn(f"{p['column']} is field {k}; print that column.", f"tail -n +2 {p['path']} | cut -d, -f{k}")
    total = sum(int(v) for v in _lines(out))
    yield _turn(f"The values add up to {total}.", f"submit {total}")


def _unique_ips(p: dict) -> Generator[str, str, None]:
    out = yield _turn("List the distinct client IPs.", f"cut -d' ' -f1 {p['path']} | sort -u")
    n = len(_lines(out))
    yield _turn(f"There are {n} distinct IPs.", f"submit {n}")


def _first_match_line(p: dict) -> Generator[str, str, None]:
    out = yield _turn("grep -n shows line numbers; keep the first hit.",
                      f"grep -n {shlex.quote(p['keyword'])} {p['path']} | head -n 1")
    yield _submit(out.split(":", 1)[0])


def _csv_count_where(p: dict) -> Generator[str, str, None]:
    header = yield _turn("Check the column order first.", f"head -n 1 {p['path']}")
    k = _column(header.strip(), p["column"])
    out = yield _turn(f"{p['column']} is field {k}; count its values.",
                      f"tail -n +2 {p['path']} | cut -d, -f{k} | sort | uniq -c")
    counts = {value: int(count) for count, value in (line.split() for line in _lines(out))}
    yield _submit(str(counts.get(p["value"], 0)))


SOLVERS: dict[str, Solver] = {
    "count_matches": _count_matches, "count_files": _count_files, "config_value": _config_value,
    "csv_extreme": _csv_extreme, "csv_sum": _csv_sum, "unique_ips": _unique_ips,
    "first_match_line": _first_match_line, "csv_count_where": _csv_count_where,
}

_MALFORMED = ("Let me look at the files first: `ls`", "I will run ls to see what is here.",
              "<cmd>ls</cmd> and then <cmd>pwd</cmd>")


def expert_rollout(env: ShellWorld, seed: int, noise: float = 0.0, max_turns: int = 8,
                   max_observation_chars: int = 2000) -> dict:
    """Play ``seed`` with the scripted solver for its task type; return a messages record.

    ``noise``: probability of a malformed turn before each real turn (drawn per seed, so reproducible), inserted
    only while enough of the ``max_turns`` turns remain for the solver to finish.
    ``max_observation_chars``: observations are cut as the generator cuts them
    (:func:`~lit_echo.envs.base.truncate_observation`); the solver reads the cut text, as a policy would.
    """
    messages: list[dict[str, Any]] = list(env.reset(seed))
    task = env.task
    assert task is not None
    solver = SOLVERS[task.type](dict(task.params))
    rng = random.Random(f"expert-noise/{env.split}/{seed}")
    reward = 0.0
    action = next(solver)
    while env.turn < max_turns:
        if noise and rng.random() < noise and max_turns - env.turn > 3:
            bad = rng.choice(_MALFORMED)
            result = env.step(bad)
            messages += [{"role": "assistant", "content": bad}, _tool_message(result, max_observation_chars)]
            continue
        result = env.step(action)
        reward += result.reward
        messages += [{"role": "assistant", "content": action}, _tool_message(result, max_observation_chars)]
        if result.done:
            break
        action = solver.send(messages[-1]["content"])
    return {"messages": messages, "reward": reward, "group_id": f"shellworld-{env.split}-{seed}",
            "metadata": {"task_type": task.type, "seed": seed, "split": env.split, "expert": True}}


def _tool_message(result, max_chars: int) -> dict[str, str]:
    message = {"role": "tool", "content": truncate_observation(result.observation, max_chars)}
    if result.warning is not None:
        message["warning"] = truncate_observation(result.warning, max_chars)
    return message


def seed_range(text: str) -> range:
    """``"START:STOP"`` from a command line as a range of task seeds (argparse type)."""
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--seeds: expected START:STOP (e.g. 0:200), got {text!r}")
    return range(int(match.group(1)), int(match.group(2)))


def write_rollouts(records, out: str) -> int:
    """Write records as JSON lines (gzip when ``out`` ends in ``.gz``) atomically; returns the count."""
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".expert-", suffix=".tmp")
    os.close(fd)
    n = 0
    try:
        opener = gzip.open if out.endswith(".gz") else open
        with opener(tmp, "wt", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write scripted-expert ShellWorld rollouts as JSON lines.")
    parser.add_argument("--split", default="train", choices=["train", "heldout_trees", "heldout_tasks"])
    parser.add_argument("--seeds", type=seed_range, default=range(200), help="START:STOP (default 0:200)")
    parser.add_argument("--out", required=True, help="output path; .gz compresses")
    parser.add_argument("--noise", type=float, default=0.0, help="probability of a malformed turn before each turn")
    parser.add_argument("--max-turns", type=int, default=8, help="assistant turns per episode at most (default 8)")
    parser.add_argument("--max-observation-chars", type=int, default=2000,
                        help="longer observations are cut with the generator's notice (default 2000)")
    args = parser.parse_args(argv)
    env = ShellWorld(args.split)
    records = (expert_rollout(env, seed, noise=args.noise, max_turns=args.max_turns,
                              max_observation_chars=args.max_observation_chars) for seed in args.seeds)
    n = write_rollouts(records, args.out)
    print(f"wrote {n} rollouts to {args.out}")


if __name__ == "__main__":
    main()
