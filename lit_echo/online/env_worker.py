"""Entry point of an environment worker process: ``python -m lit_echo.online.env_worker FD PARENT_PID``.

Started by :class:`lit_echo.online.env_runner.ProcessEnv`; not for direct use. A module of its own so that what
the worker pickles back (:class:`~lit_echo.envs.base.StepResult`, ``StepFailure``) is named by its importable
module, never ``__main__``.
"""

import sys

from lit_echo.online.env_runner import serve

if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
