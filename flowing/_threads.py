"""Running a sync body in a worker thread under the run's ``max_workers`` limiter.

On asyncio each run has its own few worker threads, fed from a queue: a call
costs a queue put and one wake-up of the event loop, several times less than
``anyio.to_thread.run_sync``, and calls that return together share a wake-up.
The threads end with the run (an abandoned one once its call returns); they also
run the scheduler's thread lanes (see ``_lanes``). Bodies may call
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
import functools
import math
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._runners import running_asyncio_loop

if TYPE_CHECKING:
    import asyncio

try:  # private details of anyio that the fast asyncio path relies on
    from anyio._core._eventloop import set_current_async_library as _set_async_library
    from anyio._core._eventloop import threadlocals as _anyio_threadlocals

    _FAST_PATH = True
except ImportError:  # a future anyio moved them: every call uses anyio.to_thread
    _FAST_PATH = False


T = TypeVar("T")

TURN_S = 0.01
"""How long a worker thread that runs task after task (a lane job, a batch of mapped
instances) may keep its ``max_workers`` token while other such work waits for one."""


class ThreadSlots:
    """The thread budget of one run: ``max_workers`` tokens for sync bodies.

    It also carries the run's fail_fast halt to where sync bodies start: once
    ``halt_reason`` is set, main-graph bodies that have not started are held back
    (``HeldBack``), in the worker thread just before the call and by the
    executor's runner (see ``on_halt``); and a mapped step's fail_fast stop to the
    executor's runner (see ``on_mapping_halt``).
    """

    def __init__(self, max_workers: int) -> None:
        self.limiter = anyio.CapacityLimiter(max_workers)
        self.halt_reason: str | None = None  # set once, when fail_fast stops the run
        # Calls waiting for a token: one body each (lanes and batches of instances
        # make way for them after their current body), or a batch of instances
        # (lanes make way for those after their turn, ``TURN_S``).
        self.waiting = 0
        self.batches_waiting = 0
        self._on_halt: list[Callable[[str], Awaitable[None]]] = []
        self._on_mapping_halt: list[Callable[[str, str], Awaitable[None]]] = []
        # The run's own worker threads (asyncio only; None: anyio.to_thread).
        self.workers: Workers | None = None
        # close(): idle threads end now, busy ones when their call returns; idempotent.
        self.close: Callable[[], None] = lambda: None
        # How a worker thread has a callback run on the loop, in the run's context.
        self.call_soon = call_soon_threadsafe()
        self._returned = LoopInbox(self.call_soon, self._reported)
        loop = running_asyncio_loop()
        if loop is not None and _FAST_PATH:
            self.workers = Workers(loop)
            self.close = weakref.finalize(self, self.workers.close)
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

    def on_mapping_halt(self, hook: Callable[[str, str], Awaitable[None]]) -> None:
        """Have ``halt_mapping(step, reason)`` await ``hook(step, reason)``; it must not raise."""
        self._on_mapping_halt.append(hook)

    async def halt_mapping(self, step: str, reason: str) -> None:
        """fail_fast stopped mapped step ``step``: let each runner hold back the bodies of
        its instances that have not started."""
        for hook in self._on_mapping_halt:
            await hook(step, reason)

    async def run(
        self, fn: Callable[[], Any], on_abandon: Callable[[], None], *, batch: bool = False
    ) -> Any:
        """Return ``fn()``, called in a worker thread; ``batch``: it runs many bodies.

        When cancelled, the thread is abandoned: ``on_abandon`` is called, the
        thread keeps its token until the function returns, and the cancellation
        propagates.
        """
        return await self.call(await self.reserve(fn, batch=batch), on_abandon)

    async def reserve(self, fn: Callable[[], Any], *, batch: bool = False) -> ThreadCall:
        """A call of ``fn`` that holds a thread token, once one is free.

        Pass it to ``call``, or give its token back with ``release``.
        """
        call = ThreadCall(fn, self._returned.put)
        try:  # a free token costs no trip through the event loop
            self.limiter.acquire_on_behalf_of_nowait(call)
        except anyio.WouldBlock:
            await self._wait_for_token(call, batch)
        return call

    def release(self, call: ThreadCall) -> None:
        """Give back the token of a reserved call that will not be made."""
        self.limiter.release_on_behalf_of(call)

    async def call(self, call: ThreadCall, on_abandon: Callable[[], None]) -> Any:
        """Return the reserved call's result, made in a worker thread (see ``run``)."""
        try:
            if self.workers is not None:
                call.wakeup = self.workers.loop.create_future()
                self.workers.submit(call)
                await call.wakeup  # a plain future: a fraction of an anyio.Event's cost
            else:
                await anyio.to_thread.run_sync(
                    call.run, abandon_on_cancel=True, limiter=self._unbounded
                )
        except BaseException:
            with _STARTING:
                call.abandoned = True
                started = call.started
            if call.reported or not started:  # no report will give the token back
                self.limiter.release_on_behalf_of(call)
            elif not call.returned:  # the report gives the token back
                on_abandon()
            raise
        self.limiter.release_on_behalf_of(call)
        return call.outcome()

    async def _wait_for_token(self, call: ThreadCall, batch: bool) -> None:
        if batch:
            self.batches_waiting += 1
        else:
            self.waiting += 1
        try:
            await self.limiter.acquire_on_behalf_of(call)
        finally:
            if batch:
                self.batches_waiting -= 1
            else:
                self.waiting -= 1

    def _reported(self, calls: list[ThreadCall]) -> None:
        if self.workers is not None:
            self.workers.done(len(calls))
        for call in calls:
            call.reported = True
            if call.abandoned and call.started:
                self.limiter.release_on_behalf_of(call)
            elif call.wakeup is not None and not call.wakeup.done():
                call.wakeup.set_result(None)


def thread_context() -> contextvars.Context:
    """A copy of the current context as a worker thread should see it.

    Like anyio's worker threads: no event loop runs in the thread, so a body may
    start its own (a nested ``Flow.run()``).
    """
    context = contextvars.copy_context()
    if _FAST_PATH:
        context.run(_set_async_library, None)
    return context


_STARTING = threading.Lock()  # makes "abandoned before it started" one step for both sides


class ThreadCall:
    """One sync call; ``started`` and ``returned`` are set by its thread, everything
    else on the event loop. A call abandoned before its thread starts it never runs
    (its token is given back at once): whether the thread could not be started, or
    the awaiting task was cancelled first."""

    __slots__ = (
        "fn", "context", "report", "reported", "wakeup", "value", "error",
        "started", "returned", "abandoned",
    )

    def __init__(self, fn: Callable[[], Any], report: Callable[[ThreadCall], object]) -> None:
        self.fn = fn
        self.context = thread_context()
        self.report = report  # from the thread, once the function returned
        self.reported = False  # the event loop has seen that the call returned
        self.wakeup: asyncio.Future[None] | None = None  # on asyncio: done once reported
        self.value: Any = None
        self.error: BaseException | None = None
        self.started = False
        self.returned = False
        self.abandoned = False

    def run(self) -> None:
        """In the worker thread: call the function unless it was abandoned already,
        then report back to the event loop."""
        with _STARTING:
            self.started = not self.abandoned
        if self.started:
            try:
                self.value = self.context.run(self.fn)
            except BaseException as error:  # re-raised in the awaiting task
                self.error = error
            self.returned = True
        self.report(self)

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class LoopInbox(Generic[T]):
    """Items put from worker threads, delivered to the event loop in batches.

    One wake-up of the loop per batch: items put while one is pending join it.
    Invariant: ``_items`` (under ``_lock``) holds what the loop has not seen; a
    delivery is scheduled whenever it is not empty. Once ``_closed``, items are refused.
    """

    def __init__(
        self, call_soon: Callable[[Callable[[], None]], object], deliver: Callable[[list[T]], None]
    ) -> None:
        self._call_soon = call_soon
        self._deliver = deliver
        self._items: list[T] = []
        self._lock = threading.Lock()
        self._closed = False

    def put(self, item: T) -> bool:
        """From any thread: have ``item`` delivered on the event loop; False (and
        dropped) once the inbox is closed."""
        with self._lock:
            if self._closed:
                return False
            self._items.append(item)
            first = len(self._items) == 1
        if first:
            try:
                self._call_soon(self._deliver_batch)
            except RuntimeError:
                pass  # the run's event loop is gone: nobody waits for the items
        return True

    def flush(self) -> None:
        """On the event loop: deliver what is pending now, without waiting for its turn."""
        self._deliver_batch()

    def close(self) -> None:
        """On the event loop: deliver what is pending, and refuse whatever comes later.

        One step under the lock: an item is either delivered now or refused, so a
        thread that checks what ``put`` returns knows whether the loop will see it.
        """
        with self._lock:
            items, self._items = self._items, []
            self._closed = True
        self._deliver(items)

    def _deliver_batch(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if items:
            self._deliver(items)


class Job(Protocol):
    def run(self) -> None:
        """In a worker thread: do the job, reporting back to the loop as it goes."""


class Workers:
    """The worker threads of one run on asyncio, fed from a queue.

    Invariant: ``_busy`` (event loop only) counts jobs submitted and not yet
    ``done``, and there are at least as many threads, so a job never waits for a
    thread: whoever submits a job holds a ``max_workers`` token for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._token = anyio.lowlevel.current_token()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0

    def submit(self, job: Job) -> None:
        if self._busy >= self._threads:
            threading.Thread(target=self._work, name="flowing worker", daemon=True).start()
            self._threads += 1
        self._busy += 1
        self._jobs.put(job)

    def done(self, count: int) -> None:
        """On the event loop: ``count`` jobs have reported that they ended."""
        self._busy -= count

    def close(self) -> None:
        for _ in range(self._threads):
            self._jobs.put(None)

    def _work(self) -> None:
        _anyio_threadlocals.current_token = self._token
        while (job := self._jobs.get()) is not None:
            job.run()
            del job  # not kept alive while the thread waits for the next one


def call_soon_threadsafe() -> Callable[[Callable[[], None]], object]:
    """How another thread schedules a callback on the running event loop, asyncio or trio.

    On asyncio the callback runs in a copy of the current context, not the calling
    thread's: tasks it starts see the caller's context variables.
    """
    native: Any = anyio.lowlevel.current_token().native_token
    loop = running_asyncio_loop()
    if loop is None:
        return native.run_sync_soon  # type: ignore[no-any-return]
    return functools.partial(loop.call_soon_threadsafe, context=contextvars.copy_context())
