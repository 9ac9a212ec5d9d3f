"""lit_echo: ECHO/PaW agent RL for PyTorch Lightning.

The public API is re-exported here lazily, so ``import lit_echo.losses`` (pure torch) does not pull in Lightning,
transformers or peft.
"""

from lit_echo._lazy import lazy_getattr

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
