"""What fxopt shows: its own output, and other libraries' log lines only when the ``fxopt`` logger is at DEBUG.

``fxopt --debug`` sets that level; a Python user may too (``logging.getLogger("fxopt").setLevel(logging.DEBUG)``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["debugging", "quiet_loggers", "native_stderr_to_debug"]

logger = logging.getLogger("fxopt")


def debugging() -> bool:
    return logger.isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these Python loggers meanwhile."""
    if debugging():
        yield
        return
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def native_stderr_to_debug(prefix: str) -> Iterator[None]:
    """What native code writes to stderr meanwhile goes to the ``fxopt`` logger at DEBUG, each line after ``prefix``.

    TVM 0.27's C++ log ("Warning: Fast mode segfaults ...", "Creating JSONDatabase") has no level setting, so file
    descriptor 2 is pointed at a temporary file while it runs.
    """
    if debugging():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                logger.debug("%s: %s", prefix, line)
