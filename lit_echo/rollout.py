"""The rollout record and its JSON-lines form.

A rollout is one episode of the agent in its environment as the model saw it: token ids, the role of each
token, and the sampling log-probs of the tokens the policy produced. Two record forms exist on disk:

* tokenized: ``{"input_ids": [...], "roles": [...], "logprobs": [... | null] | null, "reward": 1.0,
  "group_id": "task-7", "advantage": null, "policy_version": 3, "metadata": {...},
  "tokenizer_fingerprint": "597-1f0c..."?}``
* messages: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "...",
  "warning": "..."?}, ...], "reward": 1.0, "group_id": "task-7", ...}``, tokenized on load with the model's
  tokenizer (see :func:`lit_echo.chat.tokenize_messages`).

Every value must be usable by training as it is: token ids are int64 (and below the vocabulary size of the
model's tokenizer, checked by the reader once the tokenizer is known), ``policy_version`` is int64, and
``reward``, ``advantage`` and ``logprobs`` are finite and within float32 range (batches are float32 tensors).
The optional ``tokenizer_fingerprint`` (see :func:`lit_echo.chat.tokenizer_fingerprint`) names the tokenizer that
produced the ids; a reader with another tokenizer rejects the record instead of training on foreign ids.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

from lit_echo.roles import Role

_ROLE_VALUES = frozenset(int(r) for r in Role)
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch


class BadRecordError(ValueError):
    """A buffer record that does not have the documented form.

    Attributes name where and what: ``path`` and ``line`` (1-based) when known, the offending ``field`` and the
    ``expected`` form.
    """

    def __init__(self, field: str, expected: str, *, got: Any = None, path: str | None = None,
                 line: int | None = None):
        self.field = field
        self.expected = expected
        self.got = got
        self.path = path
        self.line = line
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.path}:{self.line}: " if self.path is not None else ""
        got = "" if self.got is None else f", got {_short(self.got)}"
        return f"{where}field '{self.field}': expected {self.expected}{got}"

    def located(self, path: str, line: int) -> BadRecordError:
        """The same error with the file and line filled in."""
        return BadRecordError(self.field, self.expected, got=self.got, path=path, line=line)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxlong = 2, 8, 6, 50, 40


def _short(value: Any, limit: int = 60) -> str:
    """A short repr for error messages, cheap for a million-token list and safe for a 5000-digit integer."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # int-to-string conversion limit
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Rollout:
    """One tokenized episode.

    ``input_ids`` and ``roles`` have equal length L. ``logprobs`` is None or has length L with the sampling
    log-prob of each ACTION token the policy sampled and None elsewhere (None on an ACTION token means "not
    known", which trains that token on-policy). ``advantage`` None means "compute from rewards per group".
    """

    input_ids: list[int]
    roles: list[int]
    logprobs: list[float | None] | None = None
    reward: float = 0.0
    group_id: str = ""
    advantage: float | None = None
    policy_version: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    tokenizer_fingerprint: str | None = None

    def __post_init__(self) -> None:
        validate_tokens(self.input_ids, self.roles, self.logprobs)

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_dict(self) -> dict[str, Any]:
        record = {
            "input_ids": list(self.input_ids),
            "roles": [int(r) for r in self.roles],
            "logprobs": None if self.logprobs is None else list(self.logprobs),
            "reward": self.reward,
            "group_id": self.group_id,
            "advantage": self.advantage,
            "policy_version": self.policy_version,
            "metadata": self.metadata,
        }
        if self.tokenizer_fingerprint is not None:
            record["tokenizer_fingerprint"] = self.tokenizer_fingerprint
        return record

    def to_json(self) -> str:
        # allow_nan=False: a NaN would not round-trip through strict JSON readers.
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, record: Any, vocab_size: int | None = None) -> Rollout:
        """Build from a tokenized record, raising :class:`BadRecordError` on any deviation from the form.

        ``vocab_size``: when known, token ids must be below it (the vocabulary of the model's tokenizer).
        """
        if not isinstance(record, dict):
            raise BadRecordError("<record>", "a JSON object", got=record)
        ids = _require(record, "input_ids")
        roles = _require(record, "roles")
        common = parse_common_fields(record)
        rollout = cls(input_ids=ids, roles=roles, logprobs=record.get("logprobs"), **common)
        if vocab_size is not None:
            check_vocabulary(rollout.input_ids, vocab_size)
        return rollout

    @classmethod
    def from_json(cls, line: str | bytes, vocab_size: int | None = None) -> Rollout:
        return cls.from_dict(load_record(line), vocab_size)


def load_record(line: str | bytes) -> dict:
    """One line of a buffer file as a JSON object (not yet validated); :class:`BadRecordError` if it is not one.

    Bytes must be UTF-8; a leading byte-order mark is dropped (editors on Windows write one).
    """
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecordError("<record>", "UTF-8 text", got=str(err)) from None
    line = line.removeprefix("\ufeff")
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, or an integer over 4300 digits
        raise BadRecordError("<record>", "one JSON object per line", got=str(err)) from None
    if not isinstance(record, dict):
        raise BadRecordError("<record>", "a JSON object with 'input_ids' and 'roles', or with 'messages'",
                             got=record)
    return record


def _require(record: dict, name: str) -> Any:
    if name not in record:
        raise BadRecordError(name, "present (required)")
    return record[name]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def fits_float32(x: Any) -> bool:
    """A JSON number that is finite and representable in float32 (bools are not numbers here).

    Integers are compared exactly, so a 400-digit integer is rejected instead of overflowing a conversion.
    """
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    if isinstance(x, float) and not math.isfinite(x):
        return False
    return -FLOAT32_MAX <= x <= FLOAT32_MAX


def validate_tokens(input_ids: Any, roles: Any, logprobs: Any) -> None:
    """Check the token fields of a rollout; raise :class:`BadRecordError` naming the field."""
    if (not isinstance(input_ids, list) or not input_ids
            or not all(_is_int(t) and 0 <= t <= INT64_MAX for t in input_ids)):
        raise BadRecordError("input_ids", "a non-empty list of non-negative int64 integers", got=input_ids)
    if not isinstance(roles, list) or not all(_is_int(r) and r in _ROLE_VALUES for r in roles):
        raise BadRecordError("roles", "a list of role integers 0..3 (CONTEXT, ACTION, OBSERVATION, WARNING)",
                             got=roles)
    if len(roles) != len(input_ids):
        raise BadRecordError("roles", f"the same length as input_ids ({len(input_ids)})", got=f"length {len(roles)}")
    if logprobs is not None:
        if not isinstance(logprobs, list) or len(logprobs) != len(input_ids):
            raise BadRecordError("logprobs", f"null or a list of length {len(input_ids)} (one per token)",
                                 got=logprobs if not isinstance(logprobs, list) else f"length {len(logprobs)}")
        if not all(lp is None or (fits_float32(lp) and lp <= 0) for lp in logprobs):
            raise BadRecordError("logprobs", "entries that are null or finite float32 numbers <= 0", got=logprobs)


def check_vocabulary(input_ids: list[int], vocab_size: int) -> None:
    """Token ids must index the model's embedding: ``0 <= id < vocab_size`` (``len(tokenizer)``)."""
    if max(input_ids) >= vocab_size:
        position = next(k for k, t in enumerate(input_ids) if t >= vocab_size)
        raise BadRecordError("input_ids", f"token ids below the tokenizer's vocabulary size {vocab_size}",
                             got=f"id {input_ids[position]} at position {position}")


def parse_common_fields(record: dict) -> dict[str, Any]:
    """Validate and extract the fields both record forms share (reward, group, advantage, version, metadata,
    tokenizer fingerprint)."""
    reward = record.get("reward", 0.0)
    if not fits_float32(reward):
        raise BadRecordError("reward", "a finite number within float32 range (|x| <= 3.4e38)", got=reward)
    group_id = record.get("group_id", "")
    if _is_int(group_id):
        group_id = str(group_id)
    if not isinstance(group_id, str):
        raise BadRecordError("group_id", "a string (or integer)", got=group_id)
    advantage = record.get("advantage")
    if advantage is not None and not fits_float32(advantage):
        raise BadRecordError("advantage", "null or a finite number within float32 range (|x| <= 3.4e38)",
                             got=advantage)
    version = record.get("policy_version", 0)
    if not _is_int(version) or not -INT64_MAX - 1 <= version <= INT64_MAX:
        raise BadRecordError("policy_version", "an int64 integer", got=version)
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BadRecordError("metadata", "a JSON object", got=metadata)
    fingerprint = record.get("tokenizer_fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
        raise BadRecordError("tokenizer_fingerprint", "null or a non-empty string", got=fingerprint)
    return {"reward": float(reward), "group_id": group_id,
            "advantage": None if advantage is None else float(advantage),
            "policy_version": version, "metadata": metadata, "tokenizer_fingerprint": fingerprint}
