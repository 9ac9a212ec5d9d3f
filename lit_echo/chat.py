"""Exact token roles for chat conversations, rendered with the tokenizer's own chat template (docs/method.md §2).

Two entry points:

* :func:`tokenize_messages` turns a finished conversation (OpenAI-style messages) into ``(input_ids, roles)``.
* :class:`RolloutBuilder` grows a conversation token-in/token-out during online generation: the ids the policy
  sampled are kept verbatim, everything else is appended exactly as :func:`tokenize_messages` would produce it.

How roles are found. Every message content is replaced by a unique sentinel, the conversation is rendered with
the chat template, and the rendered string is split around the sentinels into *template pieces* and *bodies*.
This is exact where a common-prefix/suffix diff is ambiguous (an assistant body starting with ``<`` next to
``<|im_end|>``, a tool body ending in ``\\n`` next to ``\\n</tool_response>``). Each piece and body is tokenized
as its own segment, so no token spans a body boundary:

* template pieces are encoded with special tokens recognised (``<|im_start|>`` is one id);
* bodies are encoded as plain text with special tokens *not* recognised, so a tool output containing the
  literal text ``<|im_end|>`` or ``<|im_start|>assistant`` stays text and cannot shift a role. (Non-special
  added tokens such as Qwen's ``<tool_call>`` are ordinary vocabulary and are still matched.)

Roles, per token (the loss shifts to targets later; nothing is shifted here):

* assistant content and the end-of-turn token the template writes right after it (``<|im_end|>``, when the
  following template text starts with a special token): ACTION;
* tool content: OBSERVATION; a tool message's ``warning`` (rendered right before its content): WARNING;
* system and user content and all template text (headers, ``<tool_response>`` wrappers, the newline after
  ``<|im_end|>``, default system prompts such as Qwen2.5's, generation prompts): CONTEXT.

BOS and whitespace: segments are encoded with ``add_special_tokens=False``. The rendered template is the single
source of truth, so a template that writes ``{{ bos_token }}`` gets its BOS (as CONTEXT) and no tokenizer
post-processor adds a second one. Byte-level BPE tokenizers (GPT-2, Qwen, Llama-3, SmolLM) encode each segment
exactly, leading spaces included; tokenizers that prepend a space to every encoded string (SentencePiece
"prefix space") would change the text at each segment boundary and are rejected with :class:`ChatTemplateError`.

Decoding all ids of a conversation gives back the rendered template string exactly, except for text a tokenizer
normalizes (Qwen2.5 applies Unicode NFC). Re-encoding that string in one piece gives other ids wherever a body
contains a special-token string (it becomes the special id) or where tokens would merge across a boundary.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lit_echo.roles import Role
from lit_echo.rollout import BadRecordError, Rollout

MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """The chat template (or tokenizer) cannot give exact per-token roles for this conversation."""


@dataclass(frozen=True)
class _Segment:
    """A run of rendered text: template scaffolding (``body_role`` None) or a message body with its role."""

    text: str
    body_role: Role | None = None
    after_assistant: bool = False  # template text right after an assistant body: may start with end-of-turn


def validate_messages(messages: Any) -> list[dict]:
    """Shallow copies of ``messages`` after checking the documented form; :class:`BadRecordError` (a ValueError)
    names the offending entry, e.g. ``messages[2].content``.

    The one place this form is checked, for buffer records and for conversations given to this module alike.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRecordError("messages", "a non-empty list of {\"role\": ..., \"content\": ...} objects",
                             got=messages)
    checked = []
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, dict):
            raise BadRecordError(where, "an object with 'role' and 'content'", got=message)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise BadRecordError(f"{where}.role", "one of " + ", ".join(map(repr, MESSAGE_ROLES)), got=role)
        _check_text(message.get("content"), f"{where}.content", "a string")
        if message.get("warning") is not None:
            if role != "tool":
                raise BadRecordError(f"{where}.warning", "only on 'tool' messages", got=role)
            _check_text(message["warning"], f"{where}.warning", "a string or null")
        if "tool_calls" in message:
            raise BadRecordError(f"{where}.tool_calls", "absent: structured 'tool_calls' are rendered by the "
                                 "template, not sampled verbatim; put the tool call text the model generated into "
                                 "'content'")
        unknown = set(message) - {"role", "content", "warning"}
        if unknown:
            raise BadRecordError(where, "only the keys 'role', 'content' and 'warning' (tool only)",
                                 got=sorted(unknown))
        checked.append(dict(message))
    return checked


def _check_text(text: Any, where: str, expected: str) -> None:
    if not isinstance(text, str):
        raise BadRecordError(where, expected, got=text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate ("\ud800" in JSON): no tokenizer can encode it
        raise BadRecordError(where, "valid Unicode text (no lone surrogates)",
                             got=f"{text[err.start]!r} at character {err.start}") from None


def _bodies(message: dict) -> list[tuple[str, Role]]:
    """The texts of one message in rendering order with their roles (a tool warning precedes its content)."""
    role = message["role"]
    if role == "assistant":
        return [(message["content"], Role.ACTION)]
    if role == "tool":
        warning = message.get("warning")
        head = [(warning, Role.WARNING)] if warning else []
        return head + [(message["content"], Role.OBSERVATION)]
    return [(message["content"], Role.CONTEXT)]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template applied to messages whose ``content`` already includes any warning."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:
        raise ChatTemplateError(f"the chat template failed to render {len(messages)} messages "
                                f"(roles {[m['role'] for m in messages]}): {err}") from err
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text)}, expected a string")
    return text


def _with_contents(messages: list[dict], contents: list[str]) -> list[dict]:
    """Messages for the template: content replaced, the ``warning`` key dropped (it is part of ``contents``)."""
    out = []
    for message, content in zip(messages, contents):
        message = {k: v for k, v in message.items() if k != "warning"}
        message["content"] = content
        out.append(message)
    return out


def _split_rendered(rendered: str, sentinels: list[str], where: list[str]) -> list[str]:
    """The template text before, between and after the sentinels (len(sentinels) + 1 strings)."""
    pieces, start = [], 0
    for sentinel, name in zip(sentinels, where):
        count = rendered.count(sentinel)
        if count != 1:
            raise ChatTemplateError(f"the chat template drops or duplicates message content: {name} appears "
                                    f"{count} times in the rendered conversation (expected exactly once), so its "
                                    f"tokens cannot get a role")
        at = rendered.find(sentinel)
        if at < start:
            raise ChatTemplateError(f"the chat template reorders messages: {name} is rendered before the "
                                    f"message that precedes it")
        pieces.append(rendered[start:at])
        start = at + len(sentinel)
    pieces.append(rendered[start:])
    return pieces


def _check_prefixes(tokenizer, real: list[dict], rendered: str) -> None:
    """Each conversation prefix renders as a prefix of the whole conversation.

    Checked before every assistant message with the generation prompt (what the policy saw when it sampled
    that message) and before every other message without it. Between consecutive tool messages the check is
    skipped: templates such as Qwen2.5's close a group of tool responses only after the last one.
    """
    for k in range(1, len(real)):
        if real[k - 1]["role"] == "tool" and real[k]["role"] == "tool":
            continue
        generation_prompt = real[k]["role"] == "assistant"
        prefix = _render(tokenizer, real[:k], generation_prompt)
        if not rendered.startswith(prefix):
            raise ChatTemplateError(
                f"the chat template is not prefix-preserving: rendering messages[:{k}]"
                f"{' with the generation prompt' if generation_prompt else ''} is not a prefix of rendering all "
                f"{len(real)} messages (e.g. it drops earlier reasoning or renders the last message differently), "
                f"so the training sequence would differ from what the policy saw. First difference at character "
                f"{_first_difference(prefix, rendered)}.")


def _first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{i}: {a[i:i + 30]!r} vs {b[i:i + 30]!r}"


def _sentinel_maker(messages: list[dict]):
    texts = [m["content"] for m in messages] + [m.get("warning") or "" for m in messages]
    while True:
        # Private-use characters around a random nonce: no template rewrites them, no content contains them.
        nonce = secrets.token_hex(6)
        if not any(nonce in t for t in texts):
            return lambda i: f"\ue000{nonce}:{i}\ue001"


def _segments(tokenizer, messages: list[dict], add_generation_prompt: bool, *,
              check_prefixes: bool = True) -> list[_Segment]:
    """The rendered conversation as alternating template and body segments (validated, exact)."""
    sentinel = _sentinel_maker(messages)
    bodies = [_bodies(m) for m in messages]
    sentinels, names, flat = [], [], []
    for i, (message, message_bodies) in enumerate(zip(messages, bodies)):
        for text, role in message_bodies:
            sentinels.append(sentinel(len(sentinels)))
            part = "warning" if role is Role.WARNING else "content"
            names.append(f"messages[{i}] ({message['role']}) {part}")
            flat.append((text, role, message["role"] == "assistant"))
    sentinel_contents, cursor = [], 0
    for message_bodies in bodies:
        sentinel_contents.append("".join(sentinels[cursor:cursor + len(message_bodies)]))
        cursor += len(message_bodies)
    rendered = _render(tokenizer, _with_contents(messages, sentinel_contents), add_generation_prompt)
    pieces = _split_rendered(rendered, sentinels, names)

    real = _with_contents(messages, ["".join(t for t, _ in b) for b in bodies])
    rendered_real = _render(tokenizer, real, add_generation_prompt)
    expected = pieces[0] + "".join(text + piece for (text, _, _), piece in zip(flat, pieces[1:]))
    if rendered_real != expected:
        raise ChatTemplateError(f"the chat template does not render message contents verbatim (it strips "
                                f"whitespace, removes reasoning, or otherwise rewrites them), so body tokens "
                                f"cannot be located exactly. First difference at character "
                                f"{_first_difference(rendered_real, expected)}.")
    if check_prefixes:
        _check_prefixes(tokenizer, real, rendered_real)

    segments = [_Segment(pieces[0])]
    for (text, role, from_assistant), piece in zip(flat, pieces[1:]):
        segments.append(_Segment(text, role))
        segments.append(_Segment(piece, after_assistant=from_assistant))
    return segments


def _encode_template(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=False) if text else []


def _encode_body(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []


def _is_special(tokenizer, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id == tokenizer.eos_token_id or (added is not None and added.special)


def _check_segment_encoding(tokenizer) -> None:
    """Reject tokenizers that add text (a prefix space) to every separately encoded segment."""
    joint = tokenizer.decode(_encode_body(tokenizer, "a") + _encode_body(tokenizer, "b"),
                             clean_up_tokenization_spaces=False)
    if joint != "ab":
        raise ChatTemplateError(f"{type(tokenizer).__name__} does not encode text segments independently "
                                f"('a' + 'b' decodes to {joint!r}), probably a SentencePiece prefix space; exact "
                                f"roles need a tokenizer that encodes a string without adding text")


def _tokenize_segments(tokenizer, segments: list[_Segment]) -> tuple[list[int], list[int]]:
    _check_segment_encoding(tokenizer)
    input_ids: list[int] = []
    roles: list[int] = []
    for segment in segments:
        if segment.body_role is None:
            ids = _encode_template(tokenizer, segment.text)
            segment_roles = [Role.CONTEXT] * len(ids)
            # The end-of-turn token is the last thing the policy samples in an assistant turn.
            if segment.after_assistant and ids and _is_special(tokenizer, ids[0]):
                segment_roles[0] = Role.ACTION
        else:
            ids = _encode_body(tokenizer, segment.text)
            segment_roles = [segment.body_role] * len(ids)
        input_ids.extend(ids)
        roles.extend(int(r) for r in segment_roles)
    return input_ids, roles


def tokenize_messages(tokenizer, messages: Sequence[dict], *,
                      add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and per-token roles of a conversation rendered with the tokenizer's chat template.

    ``messages``: dicts with ``role`` in system/user/assistant/tool and string ``content``; a tool message may
    carry ``warning`` (rendered as warning + content). Returns ``(input_ids, roles)``, both length L, roles as
    ``int(Role)``. Raises :class:`ChatTemplateError` when the template drops, duplicates, reorders or rewrites
    contents, or is not prefix-preserving across turns.
    """
    segments = _segments(tokenizer, validate_messages(messages), add_generation_prompt)
    return _tokenize_segments(tokenizer, segments)


def role_spans_text(tokenizer, input_ids: Sequence[int], roles: Sequence[int]) -> list[tuple[Role, str]]:
    """Contiguous runs of equal role, each decoded to text (special tokens kept): ``[(Role, text), ...]``."""
    if len(input_ids) != len(roles):
        raise ValueError(f"input_ids and roles differ in length ({len(input_ids)} vs {len(roles)})")
    spans: list[tuple[Role, str]] = []
    start = 0
    for end in range(1, len(roles) + 1):
        if end == len(roles) or roles[end] != roles[start]:
            text = tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            spans.append((Role(roles[start]), text))
            start = end
    return spans


_fingerprints: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable identifier of what a tokenizer's ids mean: ``"<len(tokenizer)>-<16 hex digits>"``.

    The hash covers the whole vocabulary (every token string and its id) and which added tokens are special, so
    it is the same in every process and run for the same tokenizer files, whichever tokenizer class loads them,
    and differs for a tokenizer whose ids mean other text, even at the same vocabulary size. How text is split
    into tokens (pre-tokenizer, chat template) is not part of it: stored ids keep their meaning under either.
    Rollouts record it (``Rollout.tokenizer_fingerprint``); the offline reader rejects tokenized records made
    with another tokenizer. Cached per tokenizer object (hashing a 150k vocabulary takes about 0.1 s).
    """
    try:
        return _fingerprints[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = sorted(int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    fingerprint = f"{len(tokenizer)}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    try:
        _fingerprints[tokenizer] = fingerprint
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return fingerprint


class RolloutBuilder:
    """Token-in/token-out conversation for online generation.

    Usage: ``b = RolloutBuilder(tok, [system, user])``; repeat ``ids = generate(b.prompt_ids())``,
    ``b.add_action(ids, logprobs)``, ``b.add_observation(env_text, warning)``; then ``b.to_rollout(reward, ...)``.

    Decisions:

    * Sampled ids are stored verbatim as ACTION with their log-probs; they are never re-tokenized.
    * If the sampled ids do not end with the template's end-of-turn token (generation hit its token limit), that
      token is appended as CONTEXT with no log-prob: the policy did not sample it, but the template needs it
      before the next message. (:func:`tokenize_messages` would mark it ACTION; this is the one difference.)
    * Template text around an observation is computed by rendering the conversation so far with sentinels, so
      it is exactly what :func:`tokenize_messages` gives for the same conversation; each step re-checks that the
      template is prefix-preserving and renders the contents verbatim.
    * :meth:`to_rollout` drops an unanswered trailing generation prompt and closes the last message as the
      template does, so the rollout equals ``tokenize_messages(builder.messages)`` token for token (except for a
      truncated last action's end-of-turn role, above).

    Attributes: ``input_ids``, ``roles`` (ints), ``logprobs`` (float for sampled ids, None elsewhere), all of
    length L; ``messages``, the conversation as text (assistant content decoded from the sampled ids, for
    logging).
    """

    def __init__(self, tokenizer, messages: Sequence[dict]):
        opening = validate_messages(messages)
        if opening[-1]["role"] == "assistant":
            raise ValueError("RolloutBuilder: the opening messages must end with a prompt (system/user/tool), "
                             "not an assistant message; the policy writes the assistant turns")
        self.tokenizer = tokenizer
        self.messages: list[dict] = opening
        segments = _segments(tokenizer, opening, add_generation_prompt=True)
        self.input_ids, self.roles = _tokenize_segments(tokenizer, segments)
        self.logprobs: list[float | None] = [None] * len(self.input_ids)
        self._tail_start = len(self.input_ids) - len(_encode_template(tokenizer, segments[-1].text))
        self._end_of_turn_id = self._find_end_of_turn()
        self._awaiting_action = True

    def _find_end_of_turn(self) -> int:
        probe = self.messages + [{"role": "assistant", "content": ""}]
        tail = _segments(self.tokenizer, probe, add_generation_prompt=False, check_prefixes=False)[-1].text
        ids = _encode_template(self.tokenizer, tail)
        if not ids or not _is_special(self.tokenizer, ids[0]):
            raise ChatTemplateError(f"the chat template writes {tail!r} after an assistant message, which does not "
                                    f"start with a special end-of-turn token; RolloutBuilder needs one to know "
                                    f"where a sampled turn ends")
        return ids[0]

    @property
    def end_of_turn_id(self) -> int:
        """The special token the template writes right after assistant content (e.g. ``<|im_end|>``)."""
        return self._end_of_turn_id

    def prompt_ids(self) -> list[int]:
        """The ids to generate from now: the whole conversation, ending with the generation prompt."""
        if not self._awaiting_action:
            raise RuntimeError("RolloutBuilder: an action was added last; add_observation before generating again")
        return list(self.input_ids)

    def add_action(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """Append the ids the policy sampled (ACTION, verbatim) and their sampling log-probs (one per id, <= 0).

        ``token_ids`` must stop at the end-of-turn token if it was sampled (strip padding after it).
        """
        token_ids, logprobs = [int(t) for t in token_ids], [float(lp) for lp in logprobs]
        if not self._awaiting_action:
            raise RuntimeError("RolloutBuilder: two actions in a row; add_observation between them")
        if len(token_ids) != len(logprobs):
            raise ValueError(f"add_action: {len(token_ids)} token ids but {len(logprobs)} logprobs")
        if any(not (lp <= 0.0) or lp == float("-inf") for lp in logprobs):
            raise ValueError("add_action: logprobs must be finite log-probabilities <= 0")
        if self._end_of_turn_id in token_ids[:-1]:
            raise ValueError(f"add_action: the end-of-turn id {self._end_of_turn_id} appears before the last "
                             f"position; cut the sampled ids right after it")
        sampled_end = bool(token_ids) and token_ids[-1] == self._end_of_turn_id
        content_ids = token_ids[:-1] if sampled_end else token_ids
        self.input_ids.extend(token_ids)
        self.roles.extend([int(Role.ACTION)] * len(token_ids))
        self.logprobs.extend(logprobs)
        if not sampled_end:
            self.input_ids.append(self._end_of_turn_id)
            self.roles.append(int(Role.CONTEXT))
            self.logprobs.append(None)
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(
            content_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)})
        self._tail_start = len(self.input_ids)
        self._awaiting_action = False

    def add_observation(self, content: str, warning: str | None = None) -> None:
        """Append a tool message (template CONTEXT, ``warning`` WARNING, ``content`` OBSERVATION) and the next
        generation prompt (CONTEXT)."""
        if self._awaiting_action:
            raise RuntimeError("RolloutBuilder: add_observation must follow add_action")
        message = {"role": "tool", "content": content}
        if warning:
            message["warning"] = warning
        messages = validate_messages(self.messages + [message])
        segments = _segments(self.tokenizer, messages, add_generation_prompt=True)
        # Segments after the last assistant body: [after-assistant piece, (warning,) content, closing piece].
        tail = segments[-(2 * len(_bodies(message)) + 1):]
        opening = _encode_template(self.tokenizer, tail[0].text)
        if not opening or opening[0] != self._end_of_turn_id:
            raise ChatTemplateError(f"the chat template writes {tail[0].text!r} after an assistant message, not "
                                    f"the end-of-turn token {self._end_of_turn_id} it wrote before")
        self._extend(opening[1:], Role.CONTEXT)
        for segment in tail[1:-1]:
            if segment.body_role is None:  # the (empty) template text between a warning and its content
                self._extend(_encode_template(self.tokenizer, segment.text), Role.CONTEXT)
            else:
                self._extend(_encode_body(self.tokenizer, segment.text), segment.body_role)
        self._tail_start = len(self.input_ids)
        self._extend(_encode_template(self.tokenizer, tail[-1].text), Role.CONTEXT)
        self.messages = messages
        self._awaiting_action = True

    def _extend(self, ids: list[int], role: Role) -> None:
        self.input_ids.extend(ids)
        self.roles.extend([int(role)] * len(ids))
        self.logprobs.extend([None] * len(ids))

    def to_rollout(self, reward: float, group_id: str, advantage: float | None = None, policy_version: int = 0,
                   metadata: dict[str, Any] | None = None) -> Rollout:
        """The finished episode: an unanswered trailing generation prompt is replaced by the template's closing
        text for the last message (as :func:`tokenize_messages` renders it without a generation prompt). The
        rollout records :func:`tokenizer_fingerprint` of the tokenizer, so a reader with another one rejects it."""
        closing = _segments(self.tokenizer, self.messages, add_generation_prompt=False)[-1].text
        closing_ids = _encode_template(self.tokenizer, closing)
        if not self._awaiting_action:
            # The end-of-turn token that opens the closing text is already in place (sampled or appended).
            closing_ids = closing_ids[1:]
        cut = self._tail_start
        logprobs = self.logprobs[:cut] + [None] * len(closing_ids)
        return Rollout(input_ids=self.input_ids[:cut] + closing_ids,
                       roles=self.roles[:cut] + [int(Role.CONTEXT)] * len(closing_ids),
                       logprobs=logprobs if any(lp is not None for lp in logprobs) else None,
                       reward=float(reward), group_id=group_id, advantage=advantage,
                       policy_version=policy_version, metadata=dict(metadata or {}),
                       tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer))
