"""Plain sync instances of a mapped task: run in batches on worker threads.

An instance of a mapped sync task with no gates, retries, timeout, cache, pool or
concurrency limit (in a run without journal or executor) waits for nothing but a
thread. Going through the event loop once per instance (an anyio task, a thread
call and a wake-up each) cost several times a declared task's overhead. Instead,
the instances are queued in element order, and up to ``max_workers`` batch calls,
each holding a thread token like any sync body, take them from that queue and run
them one after another in a worker thread. A call ends when the queue is empty,
when the mapping stops (fail_fast, or a KeyboardInterrupt and the like from a
body), or, after its first instance, when another sync body waits for a token or
its slice of ``SLICE_S`` is over: then it gets back in the limiter's line, so
other sync tasks of the run get threads in turn.

Starts and returns reach the event loop in batches (``LoopInbox``), where the
fan-out turns them into events and results, as for any instance.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import anyio

from ._attempt import StepContext, refuse_coroutine
from ._threads import LoopInbox, thread_context
from ._task import TaskDef

SLICE_S = 0.01  # a batch call's turn on its thread token, when others may wait for one


class Started(NamedTuple):
    """A worker thread called the body of the instance of element ``k``."""

    k: int
    at: float


class Returned(NamedTuple):
    """The instance of element ``k`` returned ``value`` or raised ``error``."""

    k: int
    value: Any
    error: BaseException | None
    started_at: float
    finished_at: float


def stops_the_run(error: BaseException) -> bool:
    """KeyboardInterrupt, SystemExit and the like: not a failure of the instance.

    A sync body's own ``asyncio.CancelledError`` fails its instance: no one cancelled it.
    """
    return not isinstance(error, (Exception, asyncio.CancelledError))


class InstanceBatches:
    """The batch calls of one mapped step.

    Invariants: ``_queue`` holds the instances no thread has taken, in element
    order, so those never started are always its whole content; ``_bodies`` maps
    each instance whose body runs now to its start time (changed by the threads,
    one dict step each under the GIL); once ``_closed``, reports are dropped.
    """

    def __init__(
        self,
        task: TaskDef[..., Any],
        kwargs: dict[str, Any],
        items: list[Any],
        ctx: StepContext,
        *,
        fail_fast: bool,
        stopping: Callable[[], bool],
        on_started: Callable[[Started], None],
        on_returned: Callable[[Returned], None],
        on_abandoned: Callable[[int], None],
    ) -> None:
        assert task.map_over is not None
        self._task = task
        self._source = task.map_over
        self._kwargs = kwargs
        self._queue: deque[tuple[int, Any]] = deque(enumerate(items))
        self._slots = ctx.slots
        self._fail_fast = fail_fast  # a failed instance stops the mapping
        self._stopping = stopping  # the fan-out stops: fail_fast, or the run stops
        self._on_started = on_started
        self._on_returned = on_returned
        self._on_abandoned = on_abandoned
        self._inbox: LoopInbox[Started | Returned] = LoopInbox(ctx.slots.call_soon, self._deliver)
        self._context = thread_context()  # each body runs in a copy of it
        self._bodies: dict[int, float] = {}
        self._halted = False  # a body failed under fail_fast, or stopped the run
        self._abandoned = False  # the step was cancelled: take nothing more
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self.interrupt: BaseException | None = None  # a body's KeyboardInterrupt or the like

    async def run(self) -> int | None:
        """Run the queued instances; return the first element never started, or None.

        A body's KeyboardInterrupt (or the like) cancels the other calls and is
        raised here, once they ended.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                for _ in range(min(int(self._slots.limiter.total_tokens), len(self._queue))):
                    tg.start_soon(self._keep_taking)
            self._inbox.flush()  # what the threads reported last, before the step's result
        finally:
            self._closed = True
        if self.interrupt is not None:
            raise self.interrupt
        return self._queue[0][0] if self._queue else None

    async def _keep_taking(self) -> None:
        while self._queue and not self._must_stop():
            await self._slots.run(self._run_batch, self._abandon)

    def _must_stop(self) -> bool:
        return self._halted or self._abandoned or self._stopping()

    def _abandon(self) -> None:
        """A batch call was cancelled while its thread ran a body: take nothing more,
        and report every body running now (once, however many calls were cancelled)."""
        if self._abandoned:
            return
        self._abandoned = True
        for k in list(self._bodies):
            self._on_abandoned(k)

    def _deliver(self, reports: list[Started | Returned]) -> None:
        """On the event loop: what the threads did since their last reports."""
        if self._closed:
            return
        try:
            for report in reports:
                if isinstance(report, Started):
                    self._on_started(report)
                elif report.error is not None and stops_the_run(report.error):
                    self._stop(report.error)
                else:
                    self._on_returned(report)
        except BaseException as error:  # e.g. an event observer's KeyboardInterrupt
            self._stop(error)

    def _stop(self, error: BaseException) -> None:
        self.interrupt = self.interrupt or error
        self._halted = True
        if self._scope is not None:
            self._scope.cancel()

    # In a worker thread from here on.

    def _run_batch(self) -> None:
        ends_at = time.monotonic() + SLICE_S
        first = True  # the call earned its token: its first instance runs even if others wait
        while not self._must_stop() and (first or self._keeps_its_turn(ends_at)):
            try:
                k, item = self._queue.popleft()
            except IndexError:
                return
            self._run_one(k, item)
            first = False

    def _keeps_its_turn(self, ends_at: float) -> bool:
        """No sync body waits for a token, and the call's slice is not over: after it,
        the call goes back into the limiter's line, behind whoever waits there."""
        return self._slots.waiting == 0 and time.monotonic() < ends_at

    def _run_one(self, k: int, item: Any) -> None:
        started_at = time.monotonic()
        self._bodies[k] = started_at
        self._inbox.put(Started(k, started_at))
        error: BaseException | None = None
        value: Any = None
        try:
            kwargs = {**self._kwargs, self._source: item}
            value = refuse_coroutine(self._task, self._context.copy().run(self._task.fn, **kwargs))
        except BaseException as exc:  # the fan-out decides what it means
            error = exc
        finished_at = time.monotonic()
        del self._bodies[k]
        if error is not None and (self._fail_fast or stops_the_run(error)):
            self._halted = True  # no instance starts after it, before the loop hears of it
        self._inbox.put(Returned(k, value, error, started_at, finished_at))
