"""Online generation: the policy plays its environment and the rollouts it samples become training batches.

* :class:`GroupGenerator` / :class:`SamplingSettings` (:mod:`.generator`): the batched multi-turn agent loop.
* :class:`OnlineRolloutDataModule` (:mod:`.datamodule`): generation wired into a Lightning fit, with a durable
  JSON-lines record of every rollout (:mod:`.writer`) and rollout metrics in the loggers (:mod:`.reporting`).
"""

from typing import TYPE_CHECKING

from lit_echo._lazy import exported_names, lazy_getattr

if TYPE_CHECKING:  # the same names for IDEs and type checkers (they do not run __getattr__)
    from lit_echo.online.datamodule import OnlineRolloutDataModule as OnlineRolloutDataModule
    from lit_echo.online.generator import GenerationStats as GenerationStats
    from lit_echo.online.generator import GroupGenerator as GroupGenerator
    from lit_echo.online.generator import SamplingSettings as SamplingSettings
    from lit_echo.online.writer import RolloutWriter as RolloutWriter

_EXPORTS = {  # module path: the public names it provides
    "lit_echo.online.generator": ("GroupGenerator", "SamplingSettings", "GenerationStats"),
    "lit_echo.online.datamodule": ("OnlineRolloutDataModule",),
    "lit_echo.online.writer": ("RolloutWriter",),
}
__all__ = exported_names(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
