"""Mistakes in the user's configuration or files, reported as one line instead of a traceback.

lit_echo's checks name the option, file, line or field and the expected form (``data.group_size: expected >= 1,
got 0``). Under the command line that message was buried: jsonargparse wraps a data module's error in its own
("Does not validate against any of the Union subtypes", followed by the whole configuration), so a typo printed
three chained tracebacks. :func:`report_user_errors` prints the message alone and exits with status 2, as argparse
does for a bad option; ``LIT_ECHO_TRACEBACK=1`` keeps the traceback. Anything else (a bug, a failure of the run, an
error raised by another library) keeps its traceback.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TRACEBACK_VARIABLE = "LIT_ECHO_TRACEBACK"
_PACKAGE_DIR = Path(__file__).resolve().parent
# What lit_echo's checks of options, paths, records and environments raise; RuntimeError and the rest are bugs or
# failures of the run.
_USER_ERROR_TYPES = (ValueError, TypeError, ImportError, OSError)


def _exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err``, then what it was raised from (``__cause__``, else an unsuppressed ``__context__``), outermost first."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)


def _raised_in_package(err: BaseException) -> bool:
    frames = list(traceback.walk_tb(err.__traceback__))
    return bool(frames) and Path(frames[-1][0].f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def _with_model_prefix(err: BaseException, message: str) -> str:
    """``model.lr: ...`` for ``lr: ...`` raised while an EchoModule was built: the name typed on the command line
    (the module's own checks, and the loss settings it validates, name the bare argument)."""
    from lit_echo.module import EchoModule

    match = re.match(r"(\w+):", message)
    if match is None or match.group(1) not in inspect.signature(EchoModule.__init__).parameters:
        return message
    inside = any(frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), EchoModule)
                 for frame, _ in traceback.walk_tb(err.__traceback__))
    return f"model.{message}" if inside else message


def user_error_message(err: BaseException) -> str | None:
    """The message of a mistake in the user's configuration or files, or None when ``err`` is something else.

    A mistake is a ValueError, TypeError, ImportError or OSError raised by lit_echo's own code. The outermost one in
    the exception chain is taken: it is the one that names the option (lit_echo wraps an environment's own error
    in one that does), under any wrapper of jsonargparse or Lightning.
    """
    for exc in _exception_chain(err):
        if isinstance(exc, _USER_ERROR_TYPES) and _raised_in_package(exc):
            return _with_model_prefix(exc, str(exc))
    return None


@contextmanager
def report_user_errors(prog: str) -> Iterator[None]:
    """Around a command's body: a user error prints ``PROG: error: MESSAGE`` on stderr and exits with status 2,
    unless ``LIT_ECHO_TRACEBACK`` is set (to anything but 0); everything else propagates unchanged."""
    try:
        yield
    except Exception as err:
        message = user_error_message(err)
        if message is None or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {message}\n(set {TRACEBACK_VARIABLE}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
