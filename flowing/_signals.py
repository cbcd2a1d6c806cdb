"""Making Ctrl-C reach a blocking ``run()`` at once, and raise KeyboardInterrupt.

``run_on_asyncio``: asyncio's runner turns SIGINT into a cancellation of the main
task, but from a plain Python signal handler, which only runs when the main
thread executes Python code. When the kernel hands the signal to one of the
worker threads, the main thread sleeps on in its selector until the next timer,
possibly for minutes. A wakeup file descriptor that the loop watches fixes that:
the C signal handler writes to it from whichever thread caught the signal, and
the loop wakes up to run the handler. trio does this on its own.

``CancellableRun``: when ``run()`` is called where an event loop already runs
(Jupyter, an async app), the flow runs on its own loop in a helper thread; a
KeyboardInterrupt raised in the calling thread while it waits cancels that run,
so it winds down promptly instead of running to the end.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio
import anyio.lowlevel

from ._threads import call_soon_threadsafe

if TYPE_CHECKING:
    import socket
    import asyncio

T = TypeVar("T")


def run_on_asyncio(run: Callable[[], Awaitable[T]]) -> T:
    """``anyio.run(run)`` on asyncio, with Ctrl-C waking the loop and raising KeyboardInterrupt."""
    import asyncio  # here, so that `import flowing` does not import asyncio

    try:
        return anyio.run(waking_on_signals, run, backend="asyncio")
    except asyncio.CancelledError:
        if sys.version_info >= (3, 11):
            raise
        # anyio's runner for Python 3.10 cancels the main task on Ctrl-C like
        # asyncio.Runner does, but then lets the CancelledError out.
        raise KeyboardInterrupt from None


async def waking_on_signals(run: Callable[[], Awaitable[T]]) -> T:
    """Await ``run()`` with the running asyncio loop woken by every signal."""
    import asyncio  # here, so that `import flowing` does not import asyncio

    with _wakeup_fd(asyncio.get_running_loop()):
        return await run()


@contextlib.contextmanager
def _wakeup_fd(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives Python signal handlers
        return
    import socket  # only a Ctrl-C-aware run on the main thread needs it

    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    try:
        loop.add_reader(reader.fileno(), _drain, reader)
    except NotImplementedError:  # Windows' proactor loop: no wake-up, Ctrl-C as asyncio has it
        reader.close()
        writer.close()
        yield
        return
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


class CancellableRun(Generic[T]):
    """``await run()`` on an event loop in another thread; ``cancel()`` from any thread."""

    def __init__(self, run: Callable[[], Awaitable[T]]) -> None:
        self._run = run
        self._lock = threading.Lock()
        # Invariant (under _lock): once `_cancelled` is set, the run's scope is
        # cancelled, by cancel() if `_schedule_cancel` was known, else on entry.
        self._cancelled = False
        self._schedule_cancel: Callable[[], object] | None = None

    async def __call__(self) -> T:
        with anyio.CancelScope() as scope:
            with self._lock:
                if self._cancelled:
                    scope.cancel()
                self._schedule_cancel = functools.partial(call_soon_threadsafe(), scope.cancel)
            return await self._run()
        # The calling thread raises its own exception; nobody reads this one.
        raise RuntimeError("the run was cancelled by the thread that started it")

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            schedule_cancel = self._schedule_cancel
        if schedule_cancel is not None:
            with contextlib.suppress(RuntimeError):  # the run's loop has finished
                schedule_cancel()
