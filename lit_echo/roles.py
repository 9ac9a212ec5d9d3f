"""Token roles: the data contract every other module stands on (docs/method.md §2)."""

from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    """What a token is trained with. The loss reads the role of the *target* token.

    CONTEXT      system/task prompt, chat-template scaffolding, padding: no loss.
    ACTION       every token the policy sampled, its end-of-turn token included: policy gradient.
    OBSERVATION  the body of an environment/tool message: world-model loss.
    WARNING      a harness-written format warning prefixed to an observation: world-model loss only
                 with ``world_target="all"``.
    """

    CONTEXT = 0
    ACTION = 1
    OBSERVATION = 2
    WARNING = 3
