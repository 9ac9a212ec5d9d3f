"""The rollout record and its JSON-lines form.

A rollout is one episode of the agent in its environment as the model saw it: token ids, the role of each
token, and the sampling log-probs of the tokens the policy produced. Two record forms exist on disk:

* tokenized: ``{"input_ids": [...], "roles": [...], "logprobs": [... | null] | null, "reward": 1.0,
  "group_id": "task-7", "advantage": null, "policy_version": 3, "metadata": {...}}``
* messages: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "...",
  "warning": "..."?}, ...], "reward": 1.0, "group_id": "task-7", ...}``, tokenized on load with the model's
  tokenizer (see :func:`lit_echo.chat.tokenize_messages`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lit_echo.roles import Role

_ROLE_VALUES = frozenset(int(r) for r in Role)


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

    def located(self, path: str, line: int) -> "BadRecordError":
        """The same error with the file and line filled in."""
        return BadRecordError(self.field, self.expected, got=self.got, path=path, line=line)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
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

    def __post_init__(self) -> None:
        validate_tokens(self.input_ids, self.roles, self.logprobs)

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_ids": list(self.input_ids),
            "roles": [int(r) for r in self.roles],
            "logprobs": None if self.logprobs is None else list(self.logprobs),
            "reward": self.reward,
            "group_id": self.group_id,
            "advantage": self.advantage,
            "policy_version": self.policy_version,
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        # allow_nan=False: a NaN would not round-trip through strict JSON readers.
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, record: Any) -> "Rollout":
        """Build from a tokenized record, raising :class:`BadRecordError` on any deviation from the form."""
        if not isinstance(record, dict):
            raise BadRecordError("<record>", "a JSON object", got=record)
        ids = _require(record, "input_ids")
        roles = _require(record, "roles")
        common = parse_common_fields(record)
        return cls(input_ids=ids, roles=roles, logprobs=record.get("logprobs"), **common)

    @classmethod
    def from_json(cls, line: str) -> "Rollout":
        return cls.from_dict(_loads(line))


def _loads(line: str) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        raise BadRecordError("<record>", "one JSON object per line", got=str(err)) from None


def _require(record: dict, name: str) -> Any:
    if name not in record:
        raise BadRecordError(name, "present (required)")
    return record[name]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def validate_tokens(input_ids: Any, roles: Any, logprobs: Any) -> None:
    """Check the token fields of a rollout; raise :class:`BadRecordError` naming the field."""
    if not isinstance(input_ids, list) or not input_ids or not all(_is_int(t) and t >= 0 for t in input_ids):
        raise BadRecordError("input_ids", "a non-empty list of non-negative integers", got=input_ids)
    if not isinstance(roles, list) or not all(_is_int(r) and r in _ROLE_VALUES for r in roles):
        raise BadRecordError("roles", "a list of role integers 0..3 (CONTEXT, ACTION, OBSERVATION, WARNING)",
                             got=roles)
    if len(roles) != len(input_ids):
        raise BadRecordError("roles", f"the same length as input_ids ({len(input_ids)})", got=f"length {len(roles)}")
    if logprobs is not None:
        if not isinstance(logprobs, list) or len(logprobs) != len(input_ids):
            raise BadRecordError("logprobs", f"null or a list of length {len(input_ids)} (one per token)",
                                 got=logprobs if not isinstance(logprobs, list) else f"length {len(logprobs)}")
        if not all(lp is None or (_is_number(lp) and lp <= 0.0) for lp in logprobs):
            raise BadRecordError("logprobs", "entries that are null or finite numbers <= 0", got=logprobs)


def parse_common_fields(record: dict) -> dict[str, Any]:
    """Validate and extract the fields both record forms share (reward, group, advantage, version, metadata)."""
    reward = record.get("reward", 0.0)
    if not _is_number(reward):
        raise BadRecordError("reward", "a finite number", got=reward)
    group_id = record.get("group_id", "")
    if _is_int(group_id):
        group_id = str(group_id)
    if not isinstance(group_id, str):
        raise BadRecordError("group_id", "a string (or integer)", got=group_id)
    advantage = record.get("advantage")
    if advantage is not None and not _is_number(advantage):
        raise BadRecordError("advantage", "null or a finite number", got=advantage)
    version = record.get("policy_version", 0)
    if not _is_int(version):
        raise BadRecordError("policy_version", "an integer", got=version)
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BadRecordError("metadata", "a JSON object", got=metadata)
    return {"reward": float(reward), "group_id": group_id,
            "advantage": None if advantage is None else float(advantage),
            "policy_version": version, "metadata": metadata}
