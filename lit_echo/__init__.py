"""lit_echo: ECHO/PaW agent RL for PyTorch Lightning."""

from lit_echo.roles import Role
from lit_echo.rollout import BadRecordError, Rollout

__all__ = ["Role", "Rollout", "BadRecordError"]
__version__ = "0.1.0"
