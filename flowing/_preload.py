"""Importing what a blocking run needs before it starts its event loop.

The engine is imported lazily, so that ``import flowing`` stays small; but a
Ctrl-C that lands inside an import can leave it half done: a first
``import asyncio`` interrupted this way raised ``TypeError: expected a message
argument`` instead of KeyboardInterrupt, and trio lost the signal in an
import-lock callback. ``run()`` therefore imports the backend, anyio's module
for it and the engine up front, holding SIGINT back until they are imported;
inside the loop the run imports nothing (tests/test_interrupt.py checks it).
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator

_BACKEND_MODULES = {"asyncio": ("asyncio", "socket"), "trio": ("trio",)}
# What Flow._execute and the scheduler import when a run starts, with what they import.
_ENGINE_MODULES = (
    "anyio",
    "anyio.lowlevel",
    "anyio.to_thread",
    "flowing._signals",
    "flowing._scheduler",
    "flowing._mapping",
    "flowing._progress",
    "flowing._journal",
    # A journal's serializers, and the value encoders of cache keys:
    "base64",
    "json",
    "pickle",
    "datetime",
    "decimal",
    "fractions",
    "pathlib",
    "uuid",
    "random",  # jittered retries
)


# The live display's, when progress is shown on a terminal and rich is installed.
_RICH_MODULES = (
    "rich.cells",
    "rich.console",
    "rich.live",
    "rich.markup",
    "rich.table",
    "rich.text",
    "rich._emoji_codes",  # imported the first time rich renders markup (a failure's line)
)


def import_run_modules(backend: str, progress: bool) -> None:
    """Import the modules a run on ``backend`` uses; a Ctrl-C meanwhile comes after."""
    with _sigint_held():
        for name in _ENGINE_MODULES:
            importlib.import_module(name)
        # A backend that is not installed: left to anyio.run(), which says how to install it.
        with contextlib.suppress(ImportError):
            for name in (*_BACKEND_MODULES[backend], f"anyio._backends._{backend}"):
                importlib.import_module(name)
        from ._progress import is_terminal

        if progress and is_terminal(sys.stderr):
            with contextlib.suppress(ImportError):  # without rich: plain lines
                for name in _RICH_MODULES:
                    importlib.import_module(name)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Delay a SIGINT until the block ends, then hand it to the handler it would have reached."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # only the main thread has signal handlers; SIG_IGN, SIG_DFL or C's own: as is
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:  # with this frame, as if it came now: trio checks it for KI protection
        previous(signal.SIGINT, sys._getframe())
