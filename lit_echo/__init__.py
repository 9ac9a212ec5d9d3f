"""lit_echo: ECHO/PaW agent RL for PyTorch Lightning.

The public API is re-exported here lazily, so ``import lit_echo.losses`` (pure torch) does not pull in Lightning,
transformers or peft. The ``TYPE_CHECKING`` imports below name the same objects for IDEs and type checkers, which
do not run ``__getattr__``; ``tests/test_imports.py`` checks that the two lists agree.
"""

from typing import TYPE_CHECKING

from lit_echo._lazy import lazy_getattr

if TYPE_CHECKING:  # ``name as name`` marks an explicit re-export (PEP 484)
    from lit_echo.callbacks import AdapterExport as AdapterExport
    from lit_echo.chat import ChatTemplateError as ChatTemplateError
    from lit_echo.chat import RolloutBuilder as RolloutBuilder
    from lit_echo.chat import tokenize_messages as tokenize_messages
    from lit_echo.data.buffer import RolloutBuffer as RolloutBuffer
    from lit_echo.data.datamodule import RolloutDataModule as RolloutDataModule
    from lit_echo.logprobs import chunked_logprobs as chunked_logprobs
    from lit_echo.losses import echo_loss as echo_loss
    from lit_echo.module import EchoModule as EchoModule
    from lit_echo.online.datamodule import OnlineRolloutDataModule as OnlineRolloutDataModule
    from lit_echo.online.generator import GroupGenerator as GroupGenerator
    from lit_echo.roles import Role as Role
    from lit_echo.rollout import BadRecordError as BadRecordError
    from lit_echo.rollout import Rollout as Rollout

__version__ = "0.1.0"

_EXPORTS = {
    "Role": "lit_echo.roles",
    "Rollout": "lit_echo.rollout",
    "BadRecordError": "lit_echo.rollout",
    "tokenize_messages": "lit_echo.chat",
    "RolloutBuilder": "lit_echo.chat",
    "ChatTemplateError": "lit_echo.chat",
    "echo_loss": "lit_echo.losses",
    "chunked_logprobs": "lit_echo.logprobs",
    "RolloutBuffer": "lit_echo.data.buffer",
    "RolloutDataModule": "lit_echo.data.datamodule",
    "EchoModule": "lit_echo.module",
    "OnlineRolloutDataModule": "lit_echo.online.datamodule",
    "GroupGenerator": "lit_echo.online.generator",
    "AdapterExport": "lit_echo.callbacks",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("lit_echo", _EXPORTS, globals())


def __dir__():
    return sorted(list(globals()) + __all__)
