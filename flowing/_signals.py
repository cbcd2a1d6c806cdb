"""Making Ctrl-C reach a blocking ``run()`` on asyncio at once.

asyncio's runner turns SIGINT into a cancellation of the main task, but from a
plain Python signal handler, which only runs when the main thread executes
Python code. When the kernel hands the signal to one of the worker threads,
the main thread sleeps on in its selector until the next timer, possibly for
minutes. A wakeup file descriptor that the loop watches fixes that: the C
signal handler writes to it from whichever thread caught the signal, and the
loop wakes up to run the handler. trio does this on its own.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")


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
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    loop.add_reader(reader.fileno(), _drain, reader)
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
