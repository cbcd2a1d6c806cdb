"""Thread lanes: sync tasks go straight to worker threads, and a sync chain stays on its thread.

On asyncio, a task that waits for nothing but a worker thread (see
``waits_only_for_a_thread``; no timeout either, and no journal or executor in the
run) needs none of the runner and attempt machinery. The scheduler puts it in
the lanes' queue, and up to ``max_workers`` lane jobs, each holding a thread
token, take tasks from that queue until it is empty. When a task succeeds and a
dependent of its own depends on nothing else and is such a task too, the same
thread runs that dependent at once: a sync chain costs no trip through the event
loop per step.

The event loop learns what happened from reports, delivered in batches: a task
started, a task finished (and which dependent its thread went on with), a job
ended. Results, events and releasing dependents stay on the loop, in the
scheduler. A task that fail_fast holds back is not reported: its thread skips
it, and the scheduler records it as never started, like any other. A lane
thread holds back its tasks as soon as a lane task fails, before the loop hears
of the failure.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import anyio

from ._attempt import call_in_context, call_result, stops_the_run
from ._graph import Graph
from ._results import StepResult
from ._task import TaskDef
from ._threads import TURN_S, LoopInbox, ThreadSlots, thread_context


class Started(NamedTuple):
    """A lane took task ``task_index`` from the queue and called its body."""

    task_index: int
    at: float


class Finished(NamedTuple):
    """Task ``task_index``'s body returned ``value`` or raised ``error``; its thread went
    on with task ``following`` (None: with none)."""

    task_index: int
    value: Any
    error: BaseException | None
    started_at: float
    finished_at: float
    following: int | None


class _JobEnded(NamedTuple):
    job: _Job


Report = Started | Finished


def lane_tasks(graph: Graph, thread_bound: Sequence[bool]) -> list[bool]:
    """Which tasks a lane may run: thread-bound ones without a timeout."""
    return [bound and task.timeout_s is None for bound, task in zip(thread_bound, graph.tasks)]


def chain_successors(graph: Graph, in_lane: Sequence[bool], done: Callable[[str], bool]) -> list[int | None]:
    """For each lane task, a lane dependent that depends on it alone and has no
    result yet (``done``): its thread may run that one next."""
    successors: list[int | None] = [None] * len(graph)
    for i, dependents in enumerate(graph.dependents):
        if not in_lane[i]:
            continue
        for d in dependents:
            task = graph.tasks[d]
            if (
                in_lane[d]
                and len(graph.deps[d]) == 1
                and task.detached == graph.tasks[i].detached
                and not done(task.name)
            ):
                successors[i] = d
                break
    return successors


def lane_result(task: TaskDef[..., Any], report: Finished) -> StepResult:
    """The result of a lane task whose body returned or raised an ``Exception``."""
    return call_result(task.name, report, detached=task.detached)


class Lanes:
    """The lane jobs of one run, and the queue they take tasks from.

    Invariants: ``_jobs`` (event loop only) counts jobs whose end the loop has
    not seen, each holding one ``max_workers`` token; ``_taking`` (changed under
    ``_lock``) counts the jobs still taking from ``_queue``. A job ends when the
    queue is empty (checked under the lock), when (after its first task) other
    sync bodies wait for a token or a batch of mapped instances waits for one and
    its turn (``TURN_S``) is over, so that neither side starves the other, or when
    the lanes stop. The loop starts a job for each task it queues and each job end
    it sees, if a token is free; the keeper waits for a token in the limiter's line
    whenever tasks are queued and fewer than ``max_workers`` jobs take them. So a
    queued task always gets a job.
    """

    def __init__(
        self,
        tasks: Sequence[TaskDef[..., Any]],
        successors: Sequence[int | None],
        slots: ThreadSlots,
        on_reports: Callable[[list[Report]], None],
        on_error: Callable[[BaseException], None],
        *,
        fail_fast: bool,
    ) -> None:
        self._tasks = tasks
        self._successors = successors
        assert slots.workers is not None, "lanes run in the run's own worker threads (asyncio)"
        self._slots = slots
        self._workers = slots.workers
        # The scheduler's callbacks, dropped by close(): nothing of a run outlives it.
        self._on_reports: Callable[[list[Report]], None] | None = on_reports
        self._on_error: Callable[[BaseException], None] | None = on_error
        self._inbox: LoopInbox[Report | _JobEnded] = LoopInbox(slots.call_soon, self._deliver)
        self._context = thread_context()  # each body runs in a copy of it
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, dict[str, Any]]] = deque()
        # Bodies running in the lanes' threads now, by task index, with their start
        # times: changed by those threads only, one dict step each under the GIL.
        self._bodies: dict[int, float] = {}
        self._taking = 0
        self._jobs = 0
        self._abandoned = False  # the run was cancelled: take nothing more, report nothing
        self._stopped = False  # the run stops (KeyboardInterrupt or the like): take nothing more
        self._fail_fast = fail_fast
        self._failed = False  # a main-graph lane task failed: fail_fast holds back the rest
        self._kept = False  # a keeper (see keep) is running or about to
        self._idle: anyio.Event | None = None

    def push(self, i: int, kwargs: dict[str, Any]) -> None:
        """Queue task ``i`` for a lane; start a job for it if a token is free."""
        self._queue.append((i, kwargs))
        self._start_job()

    def needs_keeper(self) -> bool:
        """True once while jobs run or tasks wait and no keeper does: start ``keep()`` then."""
        if self._kept or not (self._jobs or self._queue):
            return False
        self._kept = True
        return True

    async def keep(self) -> None:
        """A runner while lane jobs run or tasks wait for one, so that the phase waits
        for them. While tasks are queued and fewer than ``max_workers`` jobs take
        them, it waits for a token in the limiter's line, behind the sync bodies
        that were waiting first, and starts a job with it. Cancelled, it abandons
        the lanes."""
        limiter = self._slots.limiter
        try:
            while self._jobs or (self._queue and not self._ending):  # jobs that run are waited for
                if self._queue and not self._ending and self._taking < limiter.total_tokens:
                    job = _Job(self)
                    try:  # a free token: no checkpoint at which a cancellation could slip by
                        limiter.acquire_on_behalf_of_nowait(job)
                    except anyio.WouldBlock:
                        await limiter.acquire_on_behalf_of(job)
                    if self._queue and not self._ending:
                        self._submit(job)
                    else:
                        limiter.release_on_behalf_of(job)
                    continue
                self._idle = anyio.Event()  # set whenever a job ends
                await self._idle.wait()
        except BaseException:
            self.abandon()
            raise
        finally:
            self._kept = False

    @property
    def _ending(self) -> bool:
        return self._abandoned or self._stopped

    def stop(self) -> None:
        """The run stops: jobs take no more tasks; what they report still counts."""
        self._stopped = True

    def abandon(self) -> dict[int, float]:
        """The run is cancelled: queued tasks are dropped, running bodies finish unseen
        (their jobs still give their tokens back). Idempotent. Returns the bodies
        running now, by task index, with their start times: the loop may not have
        heard yet that they started."""
        with self._lock:
            self._abandoned = True
            self._queue.clear()
            return dict(self._bodies)

    def close(self) -> None:
        """The run is over: drop the scheduler's callbacks; late reports only return tokens."""
        self.abandon()
        self._on_reports = self._on_error = None

    def _start_job(self) -> None:
        """Start one more job if tasks are queued and a token is free.

        ``_taking`` may be stale (a job ending meanwhile): the loop calls this again
        when it sees that job end.
        """
        limiter = self._slots.limiter
        if (
            not self._queue
            or self._ending
            or self._taking >= limiter.total_tokens
            or not limiter.available_tokens
        ):
            return
        job = _Job(self)
        try:
            limiter.acquire_on_behalf_of_nowait(job)
        except anyio.WouldBlock:
            return
        self._submit(job)

    def _submit(self, job: _Job) -> None:
        """Hand ``job``, which holds a token, to a worker thread."""
        with self._lock:
            self._taking += 1
        try:
            self._workers.submit(job)
        except BaseException:  # e.g. no thread could be started
            with self._lock:
                self._taking -= 1
            self._slots.limiter.release_on_behalf_of(job)
            raise
        self._jobs += 1

    def _deliver(self, reports: list[Report | _JobEnded]) -> None:
        """On the event loop: a batch of reports from the lanes' threads."""
        try:
            steps: list[Report] = []
            for report in reports:
                if isinstance(report, _JobEnded):
                    self._job_ended(report.job)
                elif not self._abandoned:
                    steps.append(report)
            if steps and self._on_reports is not None:
                self._on_reports(steps)
        except BaseException as error:  # a loop callback must not let anything out
            if self._on_error is not None:
                self._on_error(error)

    def _job_ended(self, job: _Job) -> None:
        """Give the job's token back; what is still queued gets a job now, or the keeper's."""
        self._slots.limiter.release_on_behalf_of(job)
        self._workers.done(1)
        self._jobs -= 1
        self._start_job()
        if self._idle is not None:
            self._idle.set()

    # In a worker thread from here on.

    def run_job(self, job: _Job) -> None:
        turn_ends = time.monotonic() + TURN_S
        first = True  # the job earned its token: its first task runs even if others wait
        while (queued := self._take(first, turn_ends)) is not None:
            self._run_chain(*queued, turn_ends)
            first = False
        self._inbox.put(_JobEnded(job))

    def _take(self, first: bool, turn_ends: float) -> tuple[int, dict[str, Any]] | None:
        """The next queued task, or None once the job should end.

        A deque's popleft needs no lock; the lock makes "the queue is empty, this
        job ends" one step, so a task queued meanwhile is never left behind.
        """
        while True:
            if not self._must_end(turn_ends, first):
                try:
                    return self._queue.popleft()
                except IndexError:
                    pass
            with self._lock:
                if self._must_end(turn_ends, first) or not self._queue:
                    self._taking -= 1
                    return None

    def _must_end(self, turn_ends: float, first: bool = False) -> bool:
        """Give the token back: the lanes stop; or, after the job's first task,
        another sync body waits for a token; or a batch of mapped instances waits
        for one and the job's turn is over."""
        if self._ending:
            return True
        if first:
            return False
        slots = self._slots
        return slots.waiting > 0 or (slots.batches_waiting > 0 and time.monotonic() >= turn_ends)

    def _run_chain(self, i: int, kwargs: dict[str, Any], turn_ends: float) -> None:
        """Run task ``i``, then each chain successor it leads to while they succeed."""
        task = self._tasks[i]
        if self._held_back(task):
            return
        started_at = time.monotonic()
        if not self._begin(i, started_at):
            return
        self._inbox.put(Started(i, started_at))
        while True:
            value, error = call_in_context(task.name, task.fn, kwargs, self._context)
            finished_at = time.monotonic()
            del self._bodies[i]
            if error is not None:
                self._note_failure(task, error)
            following = self._following(i, turn_ends) if error is None else None
            self._inbox.put(Finished(i, value, error, started_at, finished_at, following))
            if following is None:
                return
            kwargs = {task.name: value}
            i, task, started_at = following, self._tasks[following], finished_at
            if not self._begin(i, started_at):
                return

    def _begin(self, i: int, started_at: float) -> bool:
        """Count the body of task ``i`` as running, unless the lanes were abandoned.

        Marked first, checked second (``abandon`` does the reverse): a body that
        runs is always among those ``abandon`` returns. One marked just as the lanes
        were abandoned does not run, though it may be among them.
        """
        self._bodies[i] = started_at
        if self._abandoned:
            del self._bodies[i]
            return False
        return True

    def _note_failure(self, task: TaskDef[..., Any], error: BaseException) -> None:
        """Act on a failure before the loop hears of it: no queued task may start meanwhile."""
        if stops_the_run(error):
            self._stopped = True  # KeyboardInterrupt, SystemExit, ...: the run stops
        elif not task.detached:
            self._failed = True

    def _following(self, i: int, turn_ends: float) -> int | None:
        d = self._successors[i]
        if d is None or self._must_end(turn_ends) or self._held_back(self._tasks[d]):
            return None
        return d

    def _held_back(self, task: TaskDef[..., Any]) -> bool:
        stopped = self._slots.halt_reason is not None or (self._fail_fast and self._failed)
        return stopped and not task.detached


class _Job:
    """One lane job: a worker thread taking tasks from the lanes' queue (and a token's borrower)."""

    __slots__ = ("_lanes",)

    def __init__(self, lanes: Lanes) -> None:
        self._lanes = lanes

    def run(self) -> None:
        self._lanes.run_job(self)
