"""Running a sync body in a worker thread under the run's ``max_workers`` limiter.

On asyncio each run has its own few worker threads, fed from a queue: a call
costs a queue put and one wake-up of the event loop, several times less than
``anyio.to_thread.run_sync``, and calls that return together share a wake-up.
The threads end with the run (an abandoned one once its call returns). Bodies may call
``anyio.from_thread`` as in anyio's own worker threads: each thread holds the
run's event-loop token where anyio looks for it (a private detail of anyio,
covered by the tests). On trio, ``anyio.from_thread`` relies on trio's own
thread-locals, so calls go through ``anyio.to_thread.run_sync`` there.

An abandoned call (its awaiting task was cancelled or timed out) cannot be
stopped and keeps running: to keep ``max_workers`` a true bound, its limiter
token is given back only when the function finally returns.
"""

from __future__ import annotations

import contextvars
import math
import queue
import sys
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._exceptions import HeldBack

if TYPE_CHECKING:
    import asyncio

try:  # private details of anyio that the fast asyncio path relies on
    from anyio._core._eventloop import set_current_async_library as _set_async_library
    from anyio._core._eventloop import threadlocals as _anyio_threadlocals

    _FAST_PATH = True
except ImportError:  # a future anyio moved them: every call uses anyio.to_thread
    _FAST_PATH = False


class ThreadSlots:
    """The thread budget of one run: ``max_workers`` tokens for sync bodies.

    It also carries the run's fail_fast halt to where sync bodies start: once
    ``halt_reason`` is set, main-graph bodies that have not started are held back
    (``HeldBack``), in the worker thread just before the call and by the
    executor's runner (see ``on_halt``).
    """

    def __init__(self, max_workers: int) -> None:
        self.limiter = anyio.CapacityLimiter(max_workers)
        self.halt_reason: str | None = None  # set once, when fail_fast stops the run
        self._on_halt: list[Callable[[str], Awaitable[None]]] = []
        self._report = _Reporter(self.limiter)
        self._workers: _Workers | None = None
        # close(): idle threads end now, busy ones when their call returns; idempotent.
        self.close: Callable[[], None] = lambda: None
        if self._report.on_asyncio and _FAST_PATH:
            self._workers = _Workers(self._report)
            self.close = weakref.finalize(self, self._workers.close)
        # Threads are bounded by `limiter`; this one only keeps anyio's global
        # default limiter (40 threads) out of the way on trio.
        self._unbounded = anyio.CapacityLimiter(math.inf)

    def on_halt(self, hook: Callable[[str], Awaitable[None]]) -> None:
        """Have ``hold_back()`` await ``hook(halt_reason)``, which must not raise."""
        self._on_halt.append(hook)

    def halt(self, reason: str) -> None:
        """fail_fast stopped the run: no main-graph body starts from now on."""
        self.halt_reason = reason

    async def hold_back(self) -> None:
        """After ``halt``: let each runner hold back the bodies it has not started."""
        assert self.halt_reason is not None
        for hook in self._on_halt:
            await hook(self.halt_reason)

    async def run(self, fn: Callable[[], Any], on_abandon: Callable[[], None]) -> Any:
        """Return ``fn()``, called in a worker thread.

        When cancelled, the thread is abandoned: ``on_abandon`` is called, the
        thread keeps its token until the function returns, and the cancellation
        propagates.
        """
        call = _Call(fn, self._report)
        try:  # a free token costs no trip through the event loop
            self.limiter.acquire_on_behalf_of_nowait(call)
        except anyio.WouldBlock:
            await self.limiter.acquire_on_behalf_of(call)
        try:
            if self._workers is not None:
                await self._workers.submit(call)
            else:
                await anyio.to_thread.run_sync(
                    call.run, abandon_on_cancel=True, limiter=self._unbounded
                )
        except BaseException:
            if call.reported:  # cancelled just after the report: release here
                self.limiter.release_on_behalf_of(call)
            else:
                call.abandoned = True  # the report gives the token back
                if not call.returned:
                    on_abandon()
            raise
        self.limiter.release_on_behalf_of(call)
        return call.outcome()


class _Call:
    """One sync call; ``returned`` is set by its thread, everything else on the event loop."""

    __slots__ = (
        "fn", "context", "report", "reported", "wakeup", "value", "error", "returned", "abandoned"
    )

    def __init__(self, fn: Callable[[], Any], report: _Reporter) -> None:
        self.fn = fn
        self.context = contextvars.copy_context()
        # Like anyio's worker threads: no event loop runs in the thread, so a body
        # may start its own (a nested ``Flow.run()``).
        if _FAST_PATH:
            self.context.run(_set_async_library, None)
        self.report = report
        self.reported = False  # the event loop has seen that the call returned
        self.wakeup: asyncio.Future[None] | None = None  # on asyncio: done once reported
        self.value: Any = None
        self.error: BaseException | None = None
        self.returned = False
        self.abandoned = False

    def run(self) -> None:
        """In the worker thread: call the function, then report back to the event loop."""
        try:
            self.value = self.context.run(self.fn)
        except BaseException as error:  # re-raised in the awaiting task
            self.error = error
        self.returned = True
        self.report.returned(self)

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _Reporter:
    """Brings returned calls back to the event loop, one wake-up per batch.

    Invariant: ``_returned`` (under ``_lock``) holds calls whose function returned
    and that the event loop has not seen; a report is scheduled whenever it is not empty.
    """

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self.token = anyio.lowlevel.current_token()
        native: Any = self.token.native_token  # an asyncio loop or a trio.lowlevel.TrioToken
        asyncio = sys.modules.get("asyncio")  # imported by whoever runs the loop
        self.on_asyncio = asyncio is not None and isinstance(native, asyncio.AbstractEventLoop)
        self._call_soon: Callable[[Callable[[], None]], Any] = (
            native.call_soon_threadsafe if self.on_asyncio else native.run_sync_soon
        )
        self._returned: deque[_Call] = deque()
        self._lock = threading.Lock()
        self.on_report: Callable[[int], None] = lambda count: None

    def returned(self, call: _Call) -> None:
        """In a worker thread: ``call`` returned."""
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
        self.on_report(len(returned))
        for call in returned:
            call.reported = True
            if call.abandoned:
                self._limiter.release_on_behalf_of(call)
            elif call.wakeup is not None and not call.wakeup.done():
                call.wakeup.set_result(None)


class _Workers:
    """The worker threads of one run on asyncio, fed from a queue.

    Invariant: ``_busy`` (event loop only) counts calls submitted and not yet
    reported back, and there are at least as many threads, so a submitted call
    never waits for a thread.
    """

    def __init__(self, report: _Reporter) -> None:
        self._token = report.token
        loop: Any = report.token.native_token  # _Workers run on asyncio only
        self._loop: asyncio.AbstractEventLoop = loop
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0
        report.on_report = self._reported

    def submit(self, call: _Call) -> asyncio.Future[None]:
        """Have a worker thread run ``call``; the future is done once it is reported.

        A plain asyncio future costs a fraction of an ``anyio.Event``, and anyio
        cancels a task awaiting one like any other.
        """
        call.wakeup = self._loop.create_future()
        self._busy += 1
        if self._busy > self._threads:
            self._threads += 1
            threading.Thread(target=self._work, name="flowing worker", daemon=True).start()
        self._calls.put(call)
        return call.wakeup

    def close(self) -> None:
        for _ in range(self._threads):
            self._calls.put(None)

    def _reported(self, count: int) -> None:
        self._busy -= count

    def _work(self) -> None:
        _anyio_threadlocals.current_token = self._token
        while (call := self._calls.get()) is not None:
            call.run()
