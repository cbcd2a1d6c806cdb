"""Running a sync body in a worker thread under the run's ``max_workers`` limiter.

Each run has its own few worker threads, fed from a queue: a call costs a queue
put and one wake-up of the event loop, several times less than
``anyio.to_thread.run_sync``, and wake-ups are shared by calls that return
together. The threads end when the run's ThreadSlots is garbage-collected.

An abandoned call (its awaiting task was cancelled or timed out) cannot be
stopped and keeps running: to keep ``max_workers`` a true bound, its limiter
token is given back only when the function finally returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio


class ThreadSlots:
    """The thread budget of one run: ``max_workers`` tokens for sync bodies."""

    def __init__(self, max_workers: int) -> None:
        self.limiter = anyio.CapacityLimiter(max_workers)
        self._workers = _Workers(self.limiter)
        weakref.finalize(self, self._workers.close)

    async def run(self, fn: Callable[[], Any], on_abandon: Callable[[], None]) -> Any:
        """Return ``fn()``, called in a worker thread.

        When cancelled, the thread is abandoned: ``on_abandon`` is called, the
        thread keeps its token until the function returns, and the cancellation
        propagates.
        """
        call = _Call(fn)
        await self.limiter.acquire_on_behalf_of(call)
        self._workers.submit(call)
        try:
            await call.done.wait()
        except BaseException:
            if call.done.is_set():  # cancelled just after the report: release here
                self.limiter.release_on_behalf_of(call)
            else:
                call.abandoned = True  # the worker's report gives the token back
                if not call.returned:
                    on_abandon()
            raise
        self.limiter.release_on_behalf_of(call)
        return call.outcome()


class _Call:
    """One sync call; ``returned`` is set by its worker, everything else on the event loop."""

    __slots__ = ("fn", "context", "done", "value", "error", "returned", "abandoned")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.context = contextvars.copy_context()
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.returned = False
        self.abandoned = False

    def run(self) -> None:
        try:
            self.value = self.context.run(self.fn)
        except BaseException as error:  # re-raised in the awaiting task
            self.error = error
        self.returned = True

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _Workers:
    """The worker threads of one run, and the way back to its event loop.

    Invariants: ``_busy`` (event loop only) counts calls submitted and not yet
    reported back, and there are at least as many threads, so a submitted call
    never waits for a thread; ``_returned`` (under ``_lock``) holds calls whose
    function returned, and one report is scheduled whenever it is not empty.
    """

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._call_soon = _call_soon_threadsafe()
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0
        self._returned: deque[_Call] = deque()
        self._lock = threading.Lock()

    def submit(self, call: _Call) -> None:
        self._busy += 1
        if self._busy > self._threads:
            self._threads += 1
            threading.Thread(target=self._work, name="flowing worker", daemon=True).start()
        self._calls.put(call)

    def close(self) -> None:
        for _ in range(self._threads):
            self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            call.run()
            with self._lock:
                self._returned.append(call)
                first = len(self._returned) == 1
            if first:
                try:
                    self._call_soon(self._report)
                except RuntimeError:
                    pass  # the run's event loop is gone: nobody waits for the result

    def _report(self) -> None:
        with self._lock:
            returned = list(self._returned)
            self._returned.clear()
        self._busy -= len(returned)
        for call in returned:
            if call.abandoned:
                self._limiter.release_on_behalf_of(call)
            else:
                call.done.set()


def _call_soon_threadsafe() -> Callable[[Callable[[], None]], Any]:
    """How a worker thread schedules a callback on the current event loop."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        import trio  # the only other anyio backend

        return trio.lowlevel.current_trio_token().run_sync_soon
