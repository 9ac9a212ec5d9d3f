"""Extracting the action from an assistant reply: one tagged block (``<cmd>...</cmd>``), a regex match, or the
whole reply, with the standard harness warnings when there is none (or several).

    >>> extract_action("List first.\\n<cmd>ls -l</cmd>")
    ParsedAction(action='ls -l', warning=None)
    >>> extract_action("I would run ls").warning
    'WARNING: no command found. Reply with exactly one command inside <cmd></cmd>, e.g. <cmd>ls</cmd>.\\n'

The warnings are what the policy learns the format from (they are trained as ``Role.WARNING``), so every built-in
environment uses these texts. Scanning is linear in the reply's length whatever it contains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_ACTION_WARNING = "WARNING: no command found. Reply with exactly one command inside {block}, e.g. {example}.\n"
MANY_ACTIONS_WARNING = ("WARNING: {n} commands found; nothing was run. Reply with exactly one command inside "
                        "{block}.\n")
EMPTY_ACTION_WARNING = "WARNING: empty command. Reply with one command, e.g. {example}.\n"
CUT_ACTION_WARNING = ("WARNING: reply cut off at the token limit before a complete command. Keep replies short, with "
                      "exactly one command inside {block}, e.g. {example}.\n")


@dataclass(frozen=True)
class ParsedAction:
    """``action``: the extracted command (stripped), or None; then ``warning`` says why."""

    action: str | None
    warning: str | None = None


def tagged_blocks(reply: str, tag: str) -> list[str]:
    """The contents of every complete ``<tag>...</tag>`` block, in order (non-nested, shortest match)."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    blocks, start = [], 0
    while True:
        begin = reply.find(opening, start)
        if begin < 0:
            return blocks
        end = reply.find(closing, begin + len(opening))
        if end < 0:  # no closing tag after this opening, so none after any later opening either
            return blocks
        blocks.append(reply[begin + len(opening):end])
        start = end + len(closing)


def extract_action(reply: str, tag: str | None = "cmd", *, pattern: str | re.Pattern | None = None,
                   example: str = "ls", truncated: bool = False) -> ParsedAction:
    """The one action in ``reply``.

    ``tag``: the action is the content of exactly one ``<tag>...</tag>`` block (free text around it is allowed);
        None: the whole reply is the action.
    ``pattern``: instead of a tag, a regular expression whose first group (or whole match) is the action; it
        must match exactly once. Use a pattern without nested repetition: it runs on untrusted text.
    ``example``: a valid command shown in the warnings.
    ``truncated``: the turn was cut at the token limit (the generator's flag); a missing action then says so.

    No action, several, or an empty one give ``ParsedAction(None, warning)`` with the standard texts.
    """
    if pattern is not None:
        compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
        found = [m.group(1) if compiled.groups else m.group(0) for m in compiled.finditer(reply)]
        block, shown = f"the form {compiled.pattern!r}", example
    elif tag is not None:
        found = tagged_blocks(reply, tag)
        block, shown = f"<{tag}></{tag}>", f"<{tag}>{example}</{tag}>"
    else:
        action = reply.strip()
        if action:
            return ParsedAction(action)
        return ParsedAction(None, EMPTY_ACTION_WARNING.format(example=example))
    actions = [a.strip() for a in found]
    if len(actions) > 1:
        return ParsedAction(None, MANY_ACTIONS_WARNING.format(n=len(actions), block=block))
    if not actions or not actions[0]:
        missing = CUT_ACTION_WARNING if truncated and not actions else NO_ACTION_WARNING
        return ParsedAction(None, missing.format(block=block, example=shown))
    return ParsedAction(actions[0])
