"""Plain sync instances of a mapped task: run in batches on worker threads.

An instance of a mapped sync task with no gates, retries, timeout, cache, pool or
concurrency limit (in a run without journal or executor) waits for nothing but a
thread. Going through the event loop once per instance (an anyio task, a thread
call and a wake-up each) cost several times a declared task's overhead. Instead,
the instances are queued in element order, and up to ``max_workers`` batch calls,
each holding a thread token like any sync body, take them from that queue and run
them one after another in a worker thread. A call ends when the queue is empty,
when the mapping stops (fail_fast, or a KeyboardInterrupt and the like from a
body), or after its first instance once a single sync body waits for a token, or
after its turn (``TURN_S``): then it gets back in the limiter's line, so that
other sync work of the run, and other mappings, get threads in turn.

Starts and returns reach the event loop in batches (``LoopInbox``), where the
fan-out turns them into events and results, as for any instance.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import anyio

from ._attempt import StepContext, call_in_context, stops_the_run
from ._task import TaskDef
from ._threads import TURN_S, LoopInbox, thread_context


class InstanceStarted(NamedTuple):
    """A worker thread is calling the body of the instance of element ``k``."""

    k: int


class InstanceReturned(NamedTuple):
    """The instance of element ``k`` returned ``value`` or raised ``error``."""

    k: int
    value: Any
    error: BaseException | None
    started_at: float
    finished_at: float


class InstanceBatches:
    """The batch calls of one mapped step.

    Invariants: ``_queue`` holds the instances no thread has started, in element
    order, so those never started are always its whole content. ``_open`` (event
    loop only) holds the instances whose start the loop has seen and whose return
    it has not. Once ``_closed``, reports are dropped.
    """

    def __init__(
        self,
        task: TaskDef[..., Any],
        kwargs: dict[str, Any],
        pending: list[tuple[int, Any]],
        ctx: StepContext,
        *,
        fail_fast: bool,
        stopping: Callable[[], bool],
        on_started: Callable[[int], None],
        on_returned: Callable[[InstanceReturned], None],
        on_abandoned: Callable[[int], None],
    ) -> None:
        assert task.map_over is not None
        self._task = task
        self._source = task.map_over
        self._kwargs = kwargs
        self._queue: deque[tuple[int, Any]] = deque(pending)  # (element index, element)
        self._slots = ctx.slots
        self._fail_fast = fail_fast  # a failed instance stops the mapping
        self._stopping = stopping  # the fan-out stops: fail_fast, or the run stops
        self._on_started = on_started
        self._on_returned = on_returned
        self._on_abandoned = on_abandoned
        self._inbox: LoopInbox[InstanceStarted | InstanceReturned] = LoopInbox(
            ctx.slots.call_soon, self._deliver
        )
        self._context = thread_context()  # each body runs in a copy of it
        self._open: set[int] = set()
        self._stop_taking = False  # a body failed under fail_fast, or stopped the run
        self._abandoned = False  # the step was cancelled: start nothing more
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self._interrupt: BaseException | None = None  # a KeyboardInterrupt or the like

    async def run(self) -> int | None:
        """Run the queued instances; return the first element never started, or None.

        A KeyboardInterrupt (or the like) from a body or an event observer cancels
        the other calls and is raised here, once they ended.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                for _ in range(min(int(self._slots.limiter.total_tokens), len(self._queue))):
                    tg.start_soon(self._keep_taking)
            self._inbox.flush()  # what the threads reported last, before the step's result
        finally:
            self._closed = True
        if self._interrupt is not None:
            raise self._interrupt
        return self._queue[0][0] if self._queue else None

    async def _keep_taking(self) -> None:
        while self._queue and not self._must_stop():
            await self._slots.run(self._run_batch, self._abandon, batch=True)

    def _must_stop(self) -> bool:
        return self._stop_taking or self._abandoned or self._stopping()

    def _abandon(self) -> None:
        """A batch call was cancelled while its thread ran: start nothing more, and
        report each body running now as abandoned, after its start (once, however
        many calls were cancelled). The inbox refuses what the threads report later,
        so a thread starts a body only once the loop is sure to hear of it."""
        if self._abandoned:
            return
        self._abandoned = True
        self._inbox.close()
        self._closed = True
        for k in list(self._open):
            self._on_abandoned(k)

    def _deliver(self, reports: list[InstanceStarted | InstanceReturned]) -> None:
        """On the event loop: what the threads did since their last reports.

        Each report is applied even when an event observer raised KeyboardInterrupt
        or the like on an earlier one (that stops the mapping, as a body's would).
        """
        if self._closed:
            return
        for report in reports:
            try:
                if isinstance(report, InstanceStarted):
                    self._open.add(report.k)
                    self._on_started(report.k)
                    continue
                self._open.discard(report.k)
                if report.error is not None and stops_the_run(report.error):
                    self._stop(report.error)
                else:
                    self._on_returned(report)
            except BaseException as error:
                self._stop(error)

    def _stop(self, error: BaseException) -> None:
        self._interrupt = self._interrupt or error
        self._stop_taking = True
        if self._scope is not None:
            self._scope.cancel()

    # In a worker thread from here on.

    def _run_batch(self) -> None:
        turn_ends = time.monotonic() + TURN_S
        first = True  # the call earned its token: its first instance runs in any case
        while not self._must_stop() and (first or self._keeps_its_turn(turn_ends)):
            try:
                k, item = self._queue.popleft()
            except IndexError:
                return
            if not self._run_one(k, item):
                self._queue.appendleft((k, item))  # abandoned meanwhile: never started
                return
            first = False

    def _keeps_its_turn(self, turn_ends: float) -> bool:
        """No single sync body waits for a token, and the turn is not over: after it,
        the call gets back in the limiter's line, behind whoever waits there (lane
        jobs of declared tasks wait there unseen, other batches are counted apart)."""
        return self._slots.waiting == 0 and time.monotonic() < turn_ends

    def _run_one(self, k: int, item: Any) -> bool:
        """Run the instance of element ``k``; False if the calls were abandoned first."""
        if not self._inbox.put(InstanceStarted(k)):
            return False
        started_at = time.monotonic()
        name, kwargs = f"{self._task.name}[{k}]", {**self._kwargs, self._source: item}
        value, error = call_in_context(name, self._task.fn, kwargs, self._context)
        finished_at = time.monotonic()
        if error is not None and (self._fail_fast or stops_the_run(error)):
            self._stop_taking = True  # no instance starts after it, before the loop hears of it
        self._inbox.put(InstanceReturned(k, value, error, started_at, finished_at))
        return True
