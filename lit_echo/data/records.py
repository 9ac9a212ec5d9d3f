"""Parsing one buffer line into a :class:`~lit_echo.rollout.Rollout` (tokenized or messages form)."""

from __future__ import annotations

import json
from typing import Any

from lit_echo.chat import MESSAGE_ROLES, tokenize_messages
from lit_echo.rollout import BadRecordError, Rollout, parse_common_fields


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check the ``messages`` field of a messages record; raise :class:`BadRecordError` naming the entry."""
    if not isinstance(messages, list) or not messages:
        raise BadRecordError("messages", "a non-empty list of {\"role\": ..., \"content\": ...} objects",
                             got=messages)
    for k, msg in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(msg, dict):
            raise BadRecordError(where, "an object with 'role' and 'content'", got=msg)
        role = msg.get("role")
        if role not in MESSAGE_ROLES:
            raise BadRecordError(f"{where}.role", "one of " + ", ".join(map(repr, MESSAGE_ROLES)), got=role)
        if not isinstance(msg.get("content"), str):
            raise BadRecordError(f"{where}.content", "a string", got=msg.get("content"))
        if "warning" in msg and msg["warning"] is not None:
            if role != "tool":
                raise BadRecordError(f"{where}.warning", "only on 'tool' messages", got=role)
            if not isinstance(msg["warning"], str):
                raise BadRecordError(f"{where}.warning", "a string or null", got=msg["warning"])
        unknown = set(msg) - {"role", "content", "warning"}
        if unknown:
            raise BadRecordError(f"{where}", "only the keys 'role', 'content' and 'warning' (tool only)",
                                 got=sorted(unknown))
    if not any(m["role"] in ("assistant", "tool") for m in messages):
        raise BadRecordError("messages", "at least one 'assistant' or 'tool' message (nothing to learn otherwise)")
    return messages


def parse_record(line: str | bytes, tokenizer: Any = None) -> Rollout:
    """One JSON line to a Rollout. Messages records are tokenized with ``tokenizer`` (body-only roles)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecordError("<record>", "UTF-8 text", got=str(err)) from None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        raise BadRecordError("<record>", "one JSON object per line", got=str(err)) from None
    if not isinstance(record, dict):
        raise BadRecordError("<record>", "a JSON object with 'input_ids' and 'roles', or with 'messages'",
                             got=record)
    if "messages" in record:
        messages = validate_messages(record["messages"])
        common = parse_common_fields(record)
        if tokenizer is None:
            raise ValueError("messages records need a tokenizer: set the data module's 'tokenizer'")
        input_ids, roles = tokenize_messages(tokenizer, messages)
        return Rollout(input_ids=input_ids, roles=roles, logprobs=None, **common)
    if "input_ids" not in record:
        raise BadRecordError("<record>", "either 'input_ids' + 'roles' (tokenized) or 'messages'",
                             got=sorted(record))
    return Rollout.from_dict(record)


def peek_group_id(line: bytes) -> str | None:
    """The record's group id without validating the rest (None when the line is not a JSON object with one).

    Used to cut the stream into groups identically in every worker, before the owning worker parses.
    """
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    group = record.get("group_id")
    if isinstance(group, bool) or not isinstance(group, (str, int)) or group == "":
        return None
    return str(group)
