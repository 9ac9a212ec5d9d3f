"""Online generation: the policy plays its environment and the rollouts it samples become training batches.

* :class:`GroupGenerator` / :class:`SamplingSettings` (:mod:`.generator`): the batched multi-turn agent loop.
* :class:`OnlineRolloutDataModule` (:mod:`.datamodule`): generation wired into a Lightning fit, with a durable
  JSON-lines record of every rollout (:mod:`.writer`) and rollout metrics in the loggers (:mod:`.reporting`).
"""

from importlib import import_module

_EXPORTS = {
    "GroupGenerator": "lit_echo.online.generator",
    "SamplingSettings": "lit_echo.online.generator",
    "GenerationStats": "lit_echo.online.generator",
    "OnlineRolloutDataModule": "lit_echo.online.datamodule",
    "RolloutWriter": "lit_echo.online.writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, like lit_echo/__init__.py: the generator does not need Lightning.
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_echo.online' has no attribute {name!r}")
