"""Hostile buffer files for the reader fuzz suite (tests/test_fuzz_reader.py, scripts/fuzz_report.py).

A case is one file: a good record, one hostile line, another good record (``line`` cases), or a whole file that
is damaged, empty or BOM-prefixed (``file`` cases). Every choice goes through ``choose(options)``, so the same
builders serve a seeded ``random.Random`` (10,000+ cases, reproducible counts) and hypothesis (``data.draw``).

The verdict of a case (:func:`check_case`) reads the file with the real :class:`RolloutBuffer` and the real tiny
tokenizer twice:
- on_bad_record="raise": either every record is accepted, or the error names the file, line 2 and a field
  (``path:2: field '...'``), or, for a damaged file, a :class:`DamagedFileError` names the file;
- on_bad_record="skip": never raises, keeps both good records, counts the bad one;
- everything accepted collates into tensors training can use: ids below the vocabulary size, finite float32
  rewards, advantages and group means, log-probs finite or NaN.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lit_echo.data.buffer import DamagedFileError, RolloutBuffer
from lit_echo.data.collate import RolloutCollator, pad_token_id
from lit_echo.rollout import BadRecordError, Rollout

Choose = Callable[[Sequence[Any]], Any]

GOOD_A = Rollout(input_ids=[1, 5, 9, 2], roles=[0, 1, 1, 2], reward=1.0, group_id="a").to_json()
GOOD_B = Rollout(input_ids=[3, 4], roles=[0, 2], reward=0.0).to_json()

# Raw JSON literals, spliced into records as text (json.dumps cannot write most of them).
HOSTILE = [
    "null", "true", "false", "0", "-1", "1.5", "-0.0", '""', '"x"', "[]", "{}", "[[]]", '{"a": 1}',
    "9223372036854775807", "9223372036854775808", "-9223372036854775809", "18446744073709551616",
    "1" + "0" * 400, "-1" + "0" * 400, "1" + "0" * 4301, "1" * 5000,
    "3e38", "3.4028234663852886e38", "3.5e38", "-3.5e38", "1e39", "1e200", "-1e200", "1e400", "-1e400", "1e-400",
    "NaN", "Infinity", "-Infinity",
    '"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"', '"\\u0000"', '"<|im_end|>"', '"\\n"',
    "[" * 5000 + "]" * 5000, "[" * 100 + "]" * 100,
]
FIELDS = ["input_ids", "roles", "logprobs", "reward", "advantage", "group_id", "policy_version", "metadata",
          "tokenizer_fingerprint", "messages", "unknown"]
MESSAGE_FIELDS = ["role", "content", "warning", "tool_calls", "name"]
BYTE_DAMAGE = ["truncate", "insert", "flip", "invalid-utf8", "bom", "nul"]
FILE_DAMAGE = ["gzip-cut", "gzip-corrupt", "not-gzip", "empty-gz", "empty", "bom-gz", "bom", "gzip-trailing",
               "multi-member"]


def _tokenized(choose: Choose) -> dict:
    n = choose([1, 2, 5, 17])
    return {"input_ids": [choose([0, 1, 7, 300, 596]) for _ in range(n)],
            "roles": [choose([0, 1, 2, 3]) for _ in range(n)],
            "logprobs": choose([None, [choose([None, -0.5, 0.0]) for _ in range(n)]]),
            "reward": choose([0.0, 1.0, -2.5]), "group_id": choose(["g", "", 7]),
            "advantage": choose([None, 0.3]), "policy_version": choose([0, 3])}


def _messages(choose: Choose) -> dict:
    turns = [{"role": "system", "content": "You are a shell agent."}, {"role": "user", "content": "Count files."},
             {"role": "assistant", "content": choose(["<cmd>ls</cmd>", "", "é 日本 🚀"])},
             {"role": "tool", "content": choose(["a\nb\n", "", "<|im_start|>assistant\n"])}]
    if choose([False, True]):
        turns[-1]["warning"] = "WARNING: no command.\n"
    return {"messages": turns, "reward": choose([0.0, 1.0]), "group_id": choose(["m", ""])}


def hostile_line(choose: Choose) -> bytes:
    """One record line broken in one or two ways: a field set to a hostile literal (the record, a list entry or
    a message entry), a field removed, or its bytes damaged."""
    record = choose([_tokenized, _messages])(choose)
    marker = "\u0001HOSTILE\u0001"
    literal = choose(HOSTILE)
    how = choose(["field", "entry", "message", "drop", "bytes", "field"])
    if how == "field":
        record[choose(FIELDS)] = marker
    elif how == "entry":
        name = choose(["input_ids", "roles", "logprobs", "messages"])
        values = record.get(name)
        if isinstance(values, list) and values:
            values[choose(range(len(values)))] = marker
        else:
            record[name] = [marker]
    elif how == "message" and "messages" in record:
        record["messages"][choose(range(len(record["messages"])))][choose(MESSAGE_FIELDS)] = marker
    elif how == "drop":
        record.pop(choose(sorted(record)), None)
    text = json.dumps(record, ensure_ascii=False).replace(json.dumps(marker, ensure_ascii=False), literal)
    raw = text.encode("utf-8", "surrogatepass")
    if how == "bytes":
        damage, at = choose(BYTE_DAMAGE), choose(range(len(raw) + 1))
        raw = {"truncate": raw[:at], "insert": raw[:at] + bytes([choose(range(256))]) + raw[at:],
               "flip": raw[:at] + bytes([raw[at] ^ (1 << choose(range(8)))]) + raw[at + 1:] if at < len(raw) else raw,
               "invalid-utf8": raw[:at] + b"\xc3\x28\xff" + raw[at:], "bom": b"\xef\xbb\xbf" + raw,
               "nul": raw[:at] + b"\x00" + raw[at:]}[damage]
    return raw.replace(b"\n", b" ")  # one line


def damaged_file(choose: Choose) -> tuple[str, bytes, int]:
    """(suffix, bytes, intact) of a whole file: gzip cut or corrupted at a random place, not gzip at all, empty,
    BOM-prefixed, with trailing garbage, or several gzip members. ``intact``: how many leading bytes are
    undamaged (every line they decode to must be kept)."""
    lines = [GOOD_A, GOOD_B] * choose([1, 10, 200])
    text = ("\n".join(lines) + "\n").encode()
    packed = gzip.compress(text)
    at = choose(range(1, len(packed)))
    kind = choose(FILE_DAMAGE)
    if kind == "gzip-cut":
        return ".jsonl.gz", packed[:at], at
    if kind == "gzip-corrupt":
        width = choose([1, 8, 64])
        return ".jsonl.gz", packed[:at] + bytes(choose(range(256)) for _ in range(width)) + packed[at + width:], at
    if kind == "gzip-trailing":
        return ".jsonl.gz", packed + choose([b"\x00" * 8, b"junk", packed[:at]]), len(packed)
    if kind == "multi-member":
        return ".jsonl.gz", packed + gzip.compress(text), len(packed)
    if kind == "not-gzip":
        return ".jsonl.gz", text, 0
    if kind == "empty-gz":
        return ".jsonl.gz", b"", 0
    if kind == "empty":
        return ".jsonl", b"", 0
    if kind == "bom-gz":
        data = gzip.compress(b"\xef\xbb\xbf" + text)
        return ".jsonl.gz", data, len(data)
    return ".jsonl", b"\xef\xbb\xbf" + text, len(text) + 3


def _sure_lines(suffix: str, data: bytes, intact: int) -> int:
    """Lines of a file that its intact leading bytes decode to (all of them must be kept)."""
    if not suffix.endswith(".gz"):
        return data.count(b"\n")
    try:
        return zlib.decompressobj(wbits=31).decompress(data[:intact]).count(b"\n")
    except zlib.error:
        return 0


def check_case(directory: Path, case: tuple[str, bytes, int], tokenizer, *, line_case: bool) -> str | None:
    """None when the reader handled the case as documented, else what went wrong."""
    suffix, data, intact = case
    path = directory / f"case{suffix}"
    for stale in directory.glob("case.*"):
        stale.unlink()
    path.write_bytes(data)
    rejected = False
    try:
        list(RolloutBuffer(path, tokenizer, shuffle=False))
    except BadRecordError as err:
        rejected = True
        if err.path != str(path) or not err.field or not str(err).startswith(f"{path}:{err.line}: field '"):
            return f"raise mode: rejection without file:line:field: {err}"
        if line_case and err.line != 2:
            return f"raise mode: the hostile line is 2, the error names line {err.line}: {err}"
        if not line_case and err.line <= _sure_lines(suffix, data, intact):
            return f"raise mode: a line before the damage was rejected: {err}"
    except DamagedFileError as err:
        rejected = True
        if line_case or err.path != str(path) or not str(err).startswith(f"{path}: damaged after line"):
            return f"raise mode: unexpected damaged-file error: {err}"
    except Exception as err:  # noqa: BLE001 - the point: anything else is a failure of the reader
        if line_case or "no usable rollout" not in str(err) or data.strip(b"\xef\xbb\xbf\n"):
            return f"raise mode: {type(err).__name__}: {err}"
        rejected = True  # an empty file: the documented EmptyStreamError
    try:
        items = list(RolloutBuffer(path, tokenizer, shuffle=False, on_bad_record="skip"))
    except Exception as err:  # noqa: BLE001
        if not line_case and "no usable rollout" in str(err):
            return None  # nothing usable at all (empty, or damaged before the first line): the documented error
        return f"skip mode raised {type(err).__name__}: {err}"
    skipped = sum(item.skipped for item in items)
    if line_case:
        ids = [item.rollout.input_ids for item in items]
        if ids[0] != json.loads(GOOD_A)["input_ids"] or ids[-1] != json.loads(GOOD_B)["input_ids"]:
            return f"skip mode lost a good record: {ids}"
        blank = not data.split(b"\n")[1].strip()  # a hostile line damaged down to blank is no record at all
        if rejected != (skipped == 1) or len(items) != 3 - skipped - blank:
            return f"skip mode disagrees with raise mode (rejected={rejected}, skipped={skipped})"
    elif len(items) < _sure_lines(suffix, data, intact):
        return f"skip mode kept {len(items)} of the {_sure_lines(suffix, data, intact)} lines before the damage"
    if not items:
        return "skip mode delivered nothing and raised nothing (an endless stream would spin)"
    try:
        return _check_trainable(items, tokenizer)
    except Exception as err:  # noqa: BLE001
        return f"accepted records do not collate: {type(err).__name__}: {err}"


def _check_trainable(items, tokenizer) -> str | None:
    batch = RolloutCollator(pad_token_id(tokenizer))(items)
    if int(batch["input_ids"].max()) >= len(tokenizer) or int(batch["input_ids"].min()) < 0:
        return "an accepted record has ids outside the vocabulary"
    for key in ("rewards", "advantages", "group_reward_mean"):
        if not torch.isfinite(batch[key]).all():
            return f"an accepted record gives a non-finite batch[{key!r}]"
    old = batch["old_logprobs"]
    if torch.isinf(old).any() or (old[~torch.isnan(old)] > 0).any():
        return "an accepted record gives infinite or positive log-probs"
    if not all(math.isfinite(item.group_reward_mean) for item in items):
        return "non-finite group mean"
    return None


def line_case(choose: Choose) -> tuple[str, bytes, int]:
    data = b"\n".join([GOOD_A.encode(), hostile_line(choose), GOOD_B.encode()]) + b"\n"
    return ".jsonl", data, len(data)


def run(cases: int, seed: int, directory: Path, tokenizer) -> dict[str, dict[str, int]]:
    """Seeded fuzzing: ``cases`` cases, 90% hostile lines and 10% damaged files. Returns
    ``{"lines": {"tried", "survived", "rejected", "failed"}, "files": {...}}`` (``rejected``: survived cases whose
    file raised in raise mode) and the first failures under ``"examples"``."""
    import random

    rng = random.Random(seed)
    counts = {kind: {"tried": 0, "survived": 0, "rejected": 0, "failed": 0} for kind in ("lines", "files")}
    examples: list[str] = []
    for _ in range(cases):
        is_line = rng.random() < 0.9
        case = line_case(rng.choice) if is_line else damaged_file(rng.choice)
        problem = check_case(directory, case, tokenizer, line_case=is_line)
        row = counts["lines" if is_line else "files"]
        row["tried"] += 1
        row["survived" if problem is None else "failed"] += 1
        row["rejected"] += problem is None and case_rejected(directory, case, tokenizer)
        if problem is not None and len(examples) < 5:
            examples.append(f"{problem} <- {case[1][:300]!r}")
    return {**counts, "examples": examples}


def case_rejected(directory: Path, case: tuple[str, bytes, int], tokenizer) -> bool:
    """Whether raise mode stops on the file written by the last :func:`check_case`."""
    try:
        list(RolloutBuffer(directory / f"case{case[0]}", tokenizer, shuffle=False))
    except Exception:  # noqa: BLE001 - check_case has already judged the error
        return True
    return False
