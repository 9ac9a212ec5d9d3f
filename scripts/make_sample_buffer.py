"""Write the sample rollout buffer (``data/sample/{train,val}.jsonl``): multi-turn tool use with REAL tool output.

Each task builds a small directory of log, CSV and config files in a temporary folder and asks a question about
it. The assistant turns are scripted (an oracle, a sloppy agent that hits real errors, one that forgets the
command format and gets a harness warning, a wrong guess), but every tool observation is the real stdout/stderr
of GNU coreutils/grep/awk run with ``bash -c`` inside that folder (``LC_ALL=C``), so the world-model loss has real
command output to learn. Four rollouts per task form a GRPO group with mixed rewards.

    python scripts/make_sample_buffer.py --out data/sample
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

SYSTEM = ("You are a shell agent. Run exactly one command per turn inside <cmd></cmd>, for example "
          "<cmd>ls</cmd>. When you know the answer, reply <cmd>submit ANSWER</cmd>.")
WARNING = "WARNING: no command found. Reply with exactly one command inside <cmd></cmd>.\n"
LEVELS = ["INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"]
SERVICES = ["api", "db", "cache", "auth", "worker"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "zoë", "łukasz"]
CITIES = ["Paris", "Berlin", "Madrid", "Lisbon", "Oslo", "Kraków", "Tokyo"]


def make_tree(root: Path, rng: random.Random) -> None:
    (root / "logs").mkdir()
    (root / "data").mkdir()
    for service in rng.sample(SERVICES, 3):
        lines = []
        for i in range(rng.randint(8, 20)):
            level = rng.choice(LEVELS)
            lines.append(f"2026-03-{rng.randint(1, 28):02d} 12:{i:02d}:{rng.randint(0, 59):02d} {level} "
                         f"{service}: request {rng.randint(100, 999)} took {rng.randint(1, 900)}ms")
        (root / "logs" / f"{service}.log").write_text("\n".join(lines) + "\n")
    rows = ["name,city,quota"] + [f"{n},{rng.choice(CITIES)},{rng.randint(10, 500)}"
                                  for n in rng.sample(NAMES, rng.randint(5, 9))]
    (root / "data" / "users.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "config.ini").write_text(f"[server]\nport = {rng.randint(1024, 9999)}\nworkers = {rng.randint(1, 16)}\n"
                                     f"[limits]\ntimeout = {rng.randint(5, 120)}\n")


def run(root: Path, command: str) -> str:
    """Real output of ``command`` (stdout then stderr) in ``root``."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(root)}
    done = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=10)
    return done.stdout + done.stderr


def tasks(root: Path, rng: random.Random) -> list[tuple[str, list[str], str]]:
    """(question, oracle commands, answer command) for this tree; the answer is computed by the last command."""
    log = rng.choice(sorted(p.name for p in (root / "logs").iterdir()))
    level = rng.choice(["ERROR", "WARN", "INFO"])
    return [
        (f"How many {level} lines are in logs/{log}?", ["ls logs", f"grep -c {level} logs/{log}"],
         f"grep -c {level} logs/{log}"),
        ("Which user in data/users.csv has the largest quota?", ["ls data", "head -n 3 data/users.csv",
                                                               "sort -t, -k3 -n -r data/users.csv | head -n 1"],
         "tail -n +2 data/users.csv | sort -t, -k3 -n -r | head -n 1 | cut -d, -f1"),
        ("What is the total quota of all users in data/users.csv?", ["cat data/users.csv",
                                                                     "cut -d, -f3 data/users.csv | tail -n +2"],
         "awk -F, 'NR>1{s+=$3} END{print s}' data/users.csv"),
        ("What port does the server in config.ini listen on?", ["ls", "grep port config.ini"],
         "grep port config.ini | cut -d' ' -f3"),
        ("How many log files are in logs/?", ["ls logs", "ls logs | wc -l"], "ls logs | wc -l"),
    ]


def turn(command: str, thought: str = "") -> dict:
    return {"role": "assistant", "content": (thought + " " if thought else "") + f"<cmd>{command}</cmd>"}


def rollouts_for(root: Path, question: str, commands: list[str], answer_cmd: str, group: str,
                 rng: random.Random) -> list[dict]:
    answer = run(root, answer_cmd).strip()
    opening = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]

    def episode(steps: list[tuple[str, str | None]], submitted: str) -> dict:
        messages = list(opening)
        for command, warning in steps:
            if warning is not None:  # a malformed turn: no command, the harness warns
                messages += [{"role": "assistant", "content": command},
                             {"role": "tool", "content": "", "warning": warning}]
                continue
            messages += [turn(command), {"role": "tool", "content": run(root, command)}]
        correct = submitted.strip().lower() == answer.lower()
        messages += [turn(f"submit {submitted}"),
                     {"role": "tool", "content": "Correct." if correct else "Incorrect."}]
        return {"messages": messages, "reward": 1.0 if correct else 0.0, "group_id": group,
                "metadata": {"question": question, "answer": answer}}

    wrong = str(int(answer) + rng.randint(1, 3)) if answer.isdigit() else "unknown"
    return [
        episode([(c, None) for c in commands], answer),                                   # oracle
        episode([("cat missing.txt", None)] + [(c, None) for c in commands], answer),     # real error first
        episode([("I will look at the files first.", WARNING)] + [(c, None) for c in commands[:1]], wrong),
        episode([(commands[0], None)], wrong),                                             # guesses too early
    ]


def write(path: Path, seeds: range) -> int:
    records = []
    for seed in seeds:
        rng = random.Random(seed)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_tree(root, rng)
            for k, (question, commands, answer_cmd) in enumerate(tasks(root, rng)):
                records += rollouts_for(root, question, commands, answer_cmd, f"sample-{seed}-{k}", rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".tmp")
    with open(tmp_path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp_path.replace(path)
    return len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample", type=Path)
    args = parser.parse_args()
    print("train:", write(args.out / "train.jsonl", range(10)), "rollouts")
    print("val:", write(args.out / "val.jsonl", range(1000, 1003)), "rollouts")


if __name__ == "__main__":
    main()
