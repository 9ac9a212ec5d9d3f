"""ShellWorld task types: a question about the generated tree, its parameters and the checked answer.

Eight types; six train, two (``first_match_line``, ``csv_count_where``) appear only in the ``heldout_tasks`` split.
Every parameter a solver needs is spelled out in the question text; answers are computed here directly from the
tree's contents (never by running the simulated shell), so a shell bug cannot make a wrong answer "correct".

==================  ==================================================================  ===================
type                question (example)                                                  answer
==================  ==================================================================  ===================
count_matches       How many lines in logs/api.log contain the text 'timeout'?          integer
count_files         How many files whose names end in '.log' are under logs/ ...?       integer
config_value        In config/app.ini, what is the value of 'port' in [database]?       string
csv_extreme         In data/employees.csv, who has the highest salary?                  name
csv_sum             What is the sum of the 'units' column in data/sales.csv?            integer
unique_ips          How many distinct client IP addresses appear in logs/access.log?    integer
first_match_line    (held out) line number of the first line containing 'ERROR'         integer
csv_count_where     (held out) how many rows have 'Sales' in the 'dept' column?         integer
==================  ==================================================================  ===================
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lit_echo.envs.shellworld.generate import LEVELS, LOG_KEYWORDS, World

TRAIN_TASK_TYPES = ("count_matches", "count_files", "config_value", "csv_extreme", "csv_sum", "unique_ips")
HELDOUT_TASK_TYPES = ("first_match_line", "csv_count_where")


@dataclass(frozen=True)
class Task:
    """``params`` holds what the question states (paths, keywords, columns), for scripted solvers."""

    type: str
    question: str
    params: dict[str, Any]
    answer: str


def _lines(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


def _csv_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    header, *rows = _lines(text)
    columns = header.split(",")
    return columns, [dict(zip(columns, row.split(","))) for row in rows]


def _keyword(rng: random.Random, text: str) -> str:
    """A keyword (level or message word) that occurs in ``text`` at least once."""
    present = [k for k in LEVELS + LOG_KEYWORDS if k in text]
    return rng.choice(present)


def count_matches(rng: random.Random, world: World) -> Task:
    path = rng.choice(world.service_logs)
    text = world.text(path)
    keyword = _keyword(rng, text)
    count = sum(keyword in line for line in _lines(text))
    return Task("count_matches", f"How many lines in {path} contain the text '{keyword}'? The match is case-sensitive.",
                {"path": path, "keyword": keyword}, str(count))


def count_files(rng: random.Random, world: World) -> Task:
    directory, ext = rng.choice((("logs", ".log"), ("data", ".csv")))

    def count(node: dict) -> int:
        return sum(count(child) if isinstance(child, dict) else name.endswith(ext) for name, child in node.items())

    return Task("count_files", f"How many files whose names end in '{ext}' are there under {directory}/, "
                f"including its subdirectories?", {"directory": directory, "ext": ext},
                str(count(world.tree[directory])))


def parse_ini(text: str) -> dict[tuple[str, str], str]:
    """``{(section, key): value}`` of an INI text (comments and blank lines skipped)."""
    values, section = {}, ""
    for line in text.split("\n"):
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            values[(section, key.strip())] = value.strip()
    return values


def config_value(rng: random.Random, world: World) -> Task:
    path = rng.choice(world.configs)
    values = parse_ini(world.text(path))
    section, key = rng.choice(sorted(values))
    return Task("config_value", f"In {path}, what is the value of the key '{key}' in the [{section}] section?",
                {"path": path, "section": section, "key": key}, values[(section, key)])


def csv_extreme(rng: random.Random, world: World) -> Task:
    _, rows = _csv_rows(world.text(world.staff_csv))
    highest = rng.random() < 0.5
    pick = (max if highest else min)(rows, key=lambda r: int(r["salary"]))
    word = "highest" if highest else "lowest"
    return Task("csv_extreme", f"In {world.staff_csv}, which person has the {word} salary? Answer with their name.",
                {"path": world.staff_csv, "column": "salary", "highest": highest, "answer_column": "name"},
                pick["name"])


def csv_sum(rng: random.Random, world: World) -> Task:
    column = rng.choice(("units", "revenue"))
    _, rows = _csv_rows(world.text(world.sales_csv))
    return Task("csv_sum", f"What is the sum of the '{column}' column in {world.sales_csv}?",
                {"path": world.sales_csv, "column": column}, str(sum(int(r[column]) for r in rows)))


def unique_ips(rng: random.Random, world: World) -> Task:
    ips = {line.split(" ", 1)[0] for line in _lines(world.text(world.access_log))}
    return Task("unique_ips", f"How many distinct client IP addresses appear in {world.access_log}? "
                "The client IP is the first field of each line.", {"path": world.access_log}, str(len(ips)))


def first_match_line(rng: random.Random, world: World) -> Task:
    path = rng.choice(world.service_logs)
    text = world.text(path)
    keyword = _keyword(rng, text)
    line = next(n for n, line in enumerate(_lines(text), 1) if keyword in line)
    return Task("first_match_line", f"What is the line number of the first line in {path} that contains "
                f"'{keyword}'? Lines are numbered from 1.", {"path": path, "keyword": keyword}, str(line))


def csv_count_where(rng: random.Random, world: World) -> Task:
    path, column = rng.choice(((world.staff_csv, "dept"), (world.sales_csv, "region"), (world.sales_csv, "product")))
    _, rows = _csv_rows(world.text(path))
    value = rng.choice(sorted({r[column] for r in rows}))
    return Task("csv_count_where", f"How many rows of {path} have the value '{value}' in the '{column}' column?",
                {"path": path, "column": column, "value": value}, str(sum(r[column] == value for r in rows)))


TASK_BUILDERS: dict[str, Callable[[random.Random, World], Task]] = {
    fn.__name__: fn for fn in (count_matches, count_files, config_value, csv_extreme, csv_sum, unique_ips,
                               first_match_line, csv_count_where)
}


def _normalize(answer: str) -> str:
    answer = " ".join(answer.split()).rstrip(".").strip("`'\"").strip()
    return answer.lower()


def _number(text: str) -> float | None:
    text = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    try:
        return float(text)
    except ValueError:
        return None


def answer_matches(submitted: str, expected: str) -> bool:
    """Equal after normalizing whitespace, case, surrounding quotes and a final period; numbers compared by
    value (``42``, ``42.0`` and ``42,000`` vs ``42000`` are equal)."""
    got, want = _normalize(submitted), _normalize(expected)
    got_number, want_number = _number(got), _number(want)
    if got_number is not None and want_number is not None:
        return abs(got_number - want_number) <= 1e-6 * max(1.0, abs(want_number))
    return got == want
