"""Parsing one buffer line into a :class:`~lit_echo.rollout.Rollout` (tokenized or messages form).

JSON decoding and the tokenized form are checked in :mod:`lit_echo.rollout`, the messages form in
:func:`lit_echo.chat.validate_messages`; this module dispatches between the two forms and checks what needs the
model's tokenizer: token ids below its vocabulary size, the record's tokenizer fingerprint, and rendering
messages with its chat template. Every problem with a record is a :class:`BadRecordError` naming the field.
"""

from __future__ import annotations

from typing import Any

from lit_echo.chat import (
    ChatTemplateError,
    tokenize_messages,
    tokenizer_fingerprint,
    validate_messages,
)
from lit_echo.rollout import BadRecordError, Rollout, load_record, parse_common_fields


class RecordParser:
    """Parses buffer lines for one tokenizer.

    ``tokenizer`` None: only tokenized records can be read, and ids are checked against int64 only; with a
    tokenizer, ids must be below ``len(tokenizer)`` and a record's ``tokenizer_fingerprint`` must be its own.
    """

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self.vocab_size = None if tokenizer is None else len(tokenizer)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str | None:
        if self._fingerprint is None and self.tokenizer is not None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        return self._fingerprint

    def __call__(self, line: str | bytes) -> Rollout:
        record = load_record(line)
        if "messages" in record:
            return self._messages_record(record)
        if "input_ids" not in record:
            raise BadRecordError("<record>", "either 'input_ids' + 'roles' (tokenized) or 'messages'",
                                 got=sorted(record))
        rollout = Rollout.from_dict(record, self.vocab_size)
        theirs = rollout.tokenizer_fingerprint
        if theirs is not None and self.fingerprint is not None and theirs != self.fingerprint:
            raise BadRecordError("tokenizer_fingerprint",
                                 f"{self.fingerprint!r}, the fingerprint of the model's tokenizer (this record's "
                                 "ids come from another tokenizer and would mean other text)", got=theirs)
        return rollout

    def _messages_record(self, record: dict) -> Rollout:
        messages = validate_messages(record["messages"])
        if not any(m["role"] in ("assistant", "tool") for m in messages):
            raise BadRecordError("messages", "at least one 'assistant' or 'tool' message (nothing to learn "
                                 "otherwise)")
        common = parse_common_fields(record)
        common["tokenizer_fingerprint"] = None  # ids come from this reader's tokenizer, whatever made the text
        if self.tokenizer is None:
            raise BadRecordError("messages", "a tokenizer to render messages records with: set the data "
                                 "module's 'tokenizer' (normally linked to the model)")
        try:
            input_ids, roles = tokenize_messages(self.tokenizer, messages)
        except ChatTemplateError as err:
            raise BadRecordError("messages", "a conversation the chat template renders exactly",
                                 got=str(err)) from None
        return Rollout(input_ids=input_ids, roles=roles, logprobs=None, **common)


def parse_record(line: str | bytes, tokenizer: Any = None) -> Rollout:
    """One JSON line to a Rollout. Messages records are tokenized with ``tokenizer`` (body-only roles)."""
    return RecordParser(tokenizer)(line)


def peek_group_id(line: bytes) -> str | None:
    """The record's group id without validating the rest (None when the line is not a JSON object with one).

    Used to cut the stream into groups identically in every worker, before the owning worker parses.
    """
    try:
        record = load_record(line)
    except BadRecordError:
        return None
    group = record.get("group_id")
    if isinstance(group, bool) or not isinstance(group, (str, int)) or group == "":
        return None
    return str(group)
