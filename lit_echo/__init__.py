"""lit_echo: ECHO/PaW agent RL for PyTorch Lightning.

The public API is re-exported here lazily, so ``import lit_echo.losses`` (pure torch) does not pull in Lightning,
transformers or peft. The ``TYPE_CHECKING`` imports below name the same objects for IDEs and type checkers, which
do not run ``__getattr__``; ``tests/test_imports.py`` checks that the two lists agree.
"""

from typing import TYPE_CHECKING

from lit_echo._lazy import exported_names, lazy_getattr

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

_EXPORTS = {  # module path: the public names it provides
    "lit_echo.roles": ("Role",),
    "lit_echo.rollout": ("Rollout", "BadRecordError"),
    "lit_echo.chat": ("tokenize_messages", "RolloutBuilder", "ChatTemplateError"),
    "lit_echo.losses": ("echo_loss",),
    "lit_echo.logprobs": ("chunked_logprobs",),
    "lit_echo.data.buffer": ("RolloutBuffer",),
    "lit_echo.data.datamodule": ("RolloutDataModule",),
    "lit_echo.module": ("EchoModule",),
    "lit_echo.online.datamodule": ("OnlineRolloutDataModule",),
    "lit_echo.online.generator": ("GroupGenerator",),
    "lit_echo.callbacks": ("AdapterExport",),
}
__all__ = exported_names(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__():
    return sorted(list(globals()) + __all__)
