"""Moved to :mod:`lit_echo.envs.shellworld.expert`; this name keeps old imports and
``python -m lit_echo.envs.expert`` working."""

from lit_echo.envs.shellworld.expert import SOLVERS, expert_rollout, main, seed_range, write_rollouts

__all__ = ["SOLVERS", "expert_rollout", "main", "seed_range", "write_rollouts"]

if __name__ == "__main__":
    main()
