"""The async core: start each task the moment its own dependencies succeed.

No layers and no polling: every task keeps a count of dependencies still to
succeed, and the task that completes the count starts its dependent at once.
Detached tasks run in a second phase, after every main task has finished.
Tasks run in runners (see ``_run_tasks``) or, plain sync ones on asyncio,
in thread lanes (see ``_lanes``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, MutableMapping
from contextlib import nullcontext
from typing import Any

import anyio
import anyio.lowlevel

from ._attempt import (
    UNASKED_CANCELLATION,
    StepContext,
    is_cancellation,
    is_one_async_call,
    one_call_failed,
    one_call_result,
    one_call_started,
    run_step,
    step_result,
    waits_only_for_a_thread,
)
from ._events import Event, FlowFinished, FlowStarted, ThreadAbandoned, make_finished, make_started
from ._exceptions import FlowingError
from ._executor import Executor
from ._cache import ResultCache
from ._graph import Graph
from ._journal import JournalRun
from ._lanes import Finished, Lanes, Report, chain_successors, lane_result, lane_tasks
from ._mapping import MappingMemory, run_mapped
from ._pools import Limits, Pool
from ._results import FAILED, SUCCEEDED, StepResult, StepState, count_states, make_result
from ._runners import BEGIN_AHEAD, Runners, open_runners
from ._task import TaskDef
from ._threads import ThreadSlots


class Scheduler:
    """One run of a graph; records every result into ``results`` as it happens."""

    def __init__(
        self,
        graph: Graph,
        results: MutableMapping[str, StepResult],
        *,
        max_workers: int,
        fail_fast: bool,
        emit: Callable[[Event], None],
        pools: Mapping[str, Pool] | None = None,
        journal: JournalRun | None = None,
        executor: Executor | None = None,
        cache: MutableMapping[str, Any] | None = None,
        mappings: MappingMemory | None = None,
    ) -> None:
        self.graph = graph
        self.cache = {} if cache is None else cache  # @task(cache=True) results, by cache key
        self.mappings = mappings if mappings is not None else MappingMemory()
        self.journal = journal
        self.executor = executor  # None: sync bodies run in this run's own threads
        self.fail_fast = fail_fast
        self.emit = emit
        # Invariant: `results` holds a final StepResult for exactly the tasks that
        # have finished (or were kept from an earlier run); it is the flow's own
        # mapping, so a cancelled run still leaves what finished.
        self.results = results
        self.max_workers = max_workers
        self.pools = pools
        # Invariant: _waiting_on[i] == number of task i's dependencies without a
        # SUCCEEDED result; a task may start only when it is 0.
        self._waiting_on = [len(deps) for deps in graph.deps]
        if results:  # kept from an earlier run: their dependents wait for less
            for i in range(len(graph.tasks)):  # one look per task, not per dependency
                if self._succeeded(i):
                    for d in graph.dependents[i]:
                        self._waiting_on[d] -= 1
        self._running: dict[int, float] = {}  # index -> monotonic start, while running
        # Tasks whose run waits for nothing but a worker thread (see _claim): at most
        # max_workers of them run at once, the others wait in _queued without an
        # anyio task. Invariants: _thread_bound_running == number of such tasks in
        # _running; _queued is empty at every phase's end: a runner that frees a slot,
        # and one that begins, starts queued tasks while a thread is free (after the
        # ready ones, within the begin bound: see _next_for_runner), dropping what
        # fail_fast holds back.
        self._thread_bound = [
            waits_only_for_a_thread(t) and (executor is None or t.local) for t in graph.tasks
        ]
        self._thread_bound_running = 0
        self._one_async_call = [t.is_async and is_one_async_call(t) for t in graph.tasks]
        self._has_detached = any(t.detached for t in graph.tasks)
        self._queued: deque[int] = deque()
        # Thread-bound tasks that thread lanes run instead, where the run has them.
        self._in_lane = lane_tasks(graph, self._thread_bound) if journal is None and executor is None else []
        self._lanes: Lanes | None = None
        self._ready: deque[int] = deque()  # made ready by a finished task, not yet claimed
        # Runners started that have not begun (bounded: see _next_for_runner).
        self._unbegun = 0
        self._begun = 0  # runners that began and have not ended
        self._phase_detached = False
        self._stopped_by: str | None = None  # first main-graph failure under fail_fast
        # The first BaseException (KeyboardInterrupt, SystemExit, ...) a task raised:
        # the run stops, and run() re-raises it once every result is recorded.
        self._interrupt: BaseException | None = None
        self._runners: Runners | None = None
        self._ctx: StepContext | None = None
        self._cancelled_class: type[BaseException] = BaseException  # set when the run starts

    async def run(self) -> None:
        """Run every unfinished task; on cancellation record the rest as CANCELLED."""
        started = time.monotonic()
        self._cancelled_class = anyio.get_cancelled_exc_class()  # lane reports come outside a task
        replayed = self._replayed()
        self.emit(FlowStarted(len(self.graph), self._unfinished_count() - len(replayed), started))
        threads = ThreadSlots(self.max_workers)
        if threads.workers is not None and any(self._in_lane):
            successors = chain_successors(self.graph, self._in_lane, self.results.__contains__)
            self._lanes = Lanes(
                self.graph.tasks,
                successors,
                threads,
                self._lane_reports,
                self._stop_run,
                fail_fast=self.fail_fast,
            )
        try:
            for i, result in replayed:
                self._record(i, result)
                for d in self.graph.dependents[i]:
                    self._waiting_on[d] -= 1
            session = self.executor.session(threads) if self.executor is not None else nullcontext()
            async with session as runner:
                self._ctx = StepContext(
                    threads,
                    self.emit,
                    len(self.graph),
                    Limits(self.pools),
                    runner=runner,
                    cache=ResultCache(self.cache, self.journal, self.graph.tasks),
                    mappings=self.mappings,
                )
                # Lane bodies start without a checkpoint: none starts in a cancelled run.
                await anyio.lowlevel.checkpoint_if_cancelled()
                await self._run_phase(detached=False)
                # An interrupted run fires no side effects.
                if self._interrupt is None and self._has_detached:
                    await self._run_phase(detached=True)
            if self._interrupt is not None:
                raise self._interrupt
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                self._abandon_lanes()
                self._cancel_unfinished(error)
            raise
        finally:
            threads.close()
            if self._lanes is not None:
                self._lanes.close()  # no cycle keeps this run's results alive
                self._lanes = None
            self._emit_flow_finished(started)

    def cancel_before_start(self, error: BaseException) -> None:
        """The run ended before it could start (``error``): record every unfinished task
        as CANCELLED, between the events that start and finish a run, so that the event
        stream's consumers see it end."""
        started = time.monotonic()
        self.emit(FlowStarted(len(self.graph), self._unfinished_count(), started))
        self._cancel_unfinished(error)
        self._emit_flow_finished(started)

    def _unfinished_count(self) -> int:
        """Tasks without a result (kept from an earlier run, or recorded in this one)."""
        if not self.results:
            return len(self.graph)
        return sum(1 for t in self.graph.tasks if t.name not in self.results)

    def _emit_flow_finished(self, started: float) -> None:
        finished = time.monotonic()
        counts = count_states(self.results.values())
        self.emit(FlowFinished(len(self.graph), counts, finished, (finished - started) * 1000))

    async def _run_phase(self, *, detached: bool) -> None:
        self._phase_detached = detached
        async with open_runners() as runners:
            self._runners = runners
            self._unbegun = self._begun = 0  # every runner of the phase before has ended
            ready = [
                i
                for i, task in enumerate(self.graph.tasks)
                if task.detached == detached
                and task.name not in self.results
                and self._waiting_on[i] == 0
            ]
            # The phase's first tasks all start at once, unlike those that finished
            # tasks make ready (see _next_for_runner): nothing runs yet for them to wait
            # behind, and 10,000 sleeps (W3) start about 5% sooner made before any begins.
            for i in ready:
                if self._claim(i):
                    self._new_runner(i)
        if self._interrupt is None:
            self._skip_never_started(detached)

    def _claim(self, i: int) -> bool:
        """Mark task ``i`` as running in a runner, unless the run stopped (fail_fast,
        or a KeyboardInterrupt or the like), it goes to the thread lanes, or it must queue."""
        if self._interrupt is not None:
            return False  # nothing new starts; _cancel_unfinished records it
        if self._stopped_by is not None and not self._phase_detached:
            return False  # fail_fast: nothing new starts; _skip_never_started records it
        if self._lanes is not None and self._in_lane[i]:
            self._lanes.push(i, self._kwargs(i))
            self._keep_lanes()
            return False
        if self._thread_bound[i]:
            if self._thread_bound_running >= self.max_workers:
                self._queued.append(i)  # an anyio task would only wait for the limiter
                return False
            self._thread_bound_running += 1
        self._running[i] = time.monotonic()
        return True

    async def _run_tasks(self, i: int) -> None:
        """A runner: run task ``i``, then go on with one task that became ready meanwhile.

        A chain of tasks thus costs no new anyio task per step, and a finished
        thread-bound task hands its worker-thread turn to a queued one. Each step,
        and a one async call's body itself, is awaited right here: no coroutine
        between the runner and the body, one object fewer for each of thousands
        of waiting tasks to hold and for the garbage collector to scan.
        """
        self._unbegun -= 1
        self._begun += 1
        # Room for more runners to wait: start what the bound held back, queued
        # thread-bound tasks too (see _next_for_runner).
        self._start_ready()
        current: int | None = i
        while current is not None:
            # Nothing but a cancellation may leave a runner: on asyncio, a
            # KeyboardInterrupt or SystemExit escaping a task breaks the event loop.
            try:
                if self._interrupt is not None or (self._stopped_by is not None and not self._phase_detached):
                    # Claimed before the run stopped: _cancel_unfinished (interrupted) or
                    # _skip_never_started (fail_fast) records it.
                    del self._running[current]
                else:
                    task = self.graph.tasks[current]
                    started_at = self._running[current]
                    try:
                        if self._one_async_call[current]:
                            assert self._ctx is not None
                            started_at = one_call_started(task, current, self._ctx)
                            value = await task.fn(**self._kwargs(current))
                            result = one_call_result(task, started_at, value)
                        else:
                            result = await self._step(task, current)
                    except Exception as error:  # a step records its own: this is a body's
                        result = one_call_failed(task, started_at, error)
                    except BaseException as exc:
                        result = self._step_let_out(current, exc)
                    if self.journal is not None:  # a success is journaled before it counts
                        with anyio.CancelScope(shield=True):
                            result = await self.journal.finish(current, result)
                    del self._running[current]
                    self._finish(current, result)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                self._stop_run(exc)  # an event observer raised KeyboardInterrupt or the like
            if self._thread_bound[current]:
                self._thread_bound_running -= 1
            current = self._next_for_runner()
        self._begun -= 1

    def _next_for_runner(self) -> int | None:
        """Start ready tasks; keep one for the calling runner (None: it ends).

        New runners wait to begin at most BEGIN_AHEAD at a time, plus one for each
        runner that has begun and not ended (it waits for something: more should start
        meanwhile), and each runner that begins starts more (see _run_tasks). So a
        fan-out of thousands of quick tasks is made as the event loop gets to it, not
        at once: its tasks are gone before the garbage collector promotes them to its
        oldest generation, whose full collections would scan them again and again
        (W1 async, 100,000 tasks: 1.8 s -> 0.6 s). A fan-out of waiting tasks still
        starts them all, doubling the runners made at each turn of the event loop.
        """
        kept: int | None = None
        while (kept is None or self._unbegun < BEGIN_AHEAD + self._begun) and (
            self._ready or (self._queued and self._thread_bound_running < self.max_workers)
        ):
            candidate = self._ready.popleft() if self._ready else self._queued.popleft()
            if not self._claim(candidate):
                continue
            if kept is None:
                kept = candidate
            else:
                self._new_runner(candidate)
        return kept

    def _new_runner(self, i: int) -> None:
        """Start claimed task ``i`` in a runner of its own (see _run_tasks)."""
        assert self._runners is not None
        self._unbegun += 1
        self._runners.start_soon(self._run_tasks, i, self.graph.tasks[i].name)

    def _step(self, task: TaskDef[..., Any], i: int) -> Coroutine[Any, Any, StepResult]:
        """Task ``i``'s run, to await: it records every Exception in its result."""
        assert self._ctx is not None
        if task.map_over is None:
            return run_step(task, i, self._kwargs(i), self._ctx)
        return self._run_mapped(task, i, self._kwargs(i))

    def _step_let_out(self, i: int, exc: BaseException) -> StepResult:
        """Task ``i``'s step let out a BaseException: the run's own cancellation goes
        on out of the runner; any other is the task's (see _let_out)."""
        cancelled = isinstance(exc, self._cancelled_class)
        if cancelled and anyio.current_effective_deadline() == -math.inf:
            raise exc  # the run really is being cancelled
        return self._let_out(i, exc)

    def _let_out(self, i: int, exc: BaseException) -> StepResult:
        """Task ``i`` let out a BaseException that is no Exception: a cancellation of
        its own (e.g. asyncio.CancelledError, which would cancel every task of the run
        without a trace) fails the task; anything else (KeyboardInterrupt, ...) stops the run."""
        if is_cancellation(exc, self._cancelled_class):
            return self._failed_with(i, exc, UNASKED_CANCELLATION)
        self._stop_run(exc)
        return self._failed_with(i, exc, f"raised {type(exc).__name__}, which stopped the run")

    def _lane_reports(self, reports: list[Report]) -> None:
        """On the event loop: what the thread lanes did since their last reports.

        Each report is applied even when an event observer raises KeyboardInterrupt
        or the like on an earlier one (that stops the run, as in a runner).
        """
        for report in reports:
            try:
                if isinstance(report, Finished):
                    self._lane_finished(report)
                else:
                    self._running[report.task_index] = report.at
                    self._emit_started(report.task_index)
            except BaseException as exc:
                self._stop_run(exc)
        self._start_ready()

    def _lane_finished(self, report: Finished) -> None:
        i, following = report.task_index, report.following
        if following is not None:  # claimed by the thread, before i's dependents are released
            self._running[following] = report.finished_at
        if report.error is None or isinstance(report.error, Exception):
            result = lane_result(self.graph.tasks[i], report)
        else:
            result = self._let_out(i, report.error)
        del self._running[i]
        self._finish(i, result)
        if following is not None:
            self._emit_started(following)

    def _emit_started(self, i: int) -> None:
        """A lane task started; like every event, stamped when the loop emits it."""
        now = time.monotonic()
        self.emit(make_started(self.graph.tasks[i].name, i, len(self.graph), now, 1, 1))

    def _keep_lanes(self) -> None:
        """Have the phase wait for the thread lanes while they run (see Lanes.keep)."""
        assert self._lanes is not None and self._runners is not None
        if self._lanes.needs_keeper():
            lanes = self._lanes
            self._runners.start_soon(lambda _: lanes.keep(), -1, "flowing thread lanes")

    def _abandon_lanes(self) -> None:
        """The run is cancelled: the lanes' running bodies go on in their threads, unseen.

        A body may have started in its thread before the loop heard of it: it counts
        as running (and started) all the same.
        """
        if self._lanes is None:
            return
        for i, started_at in self._lanes.abandon().items():
            if i not in self._running:
                self._running[i] = started_at
                self._emit_started(i)
        now = time.monotonic()
        for i in self._running:
            if self._in_lane[i]:
                self.emit(ThreadAbandoned(self.graph.tasks[i].name, i, len(self.graph), now, 1))

    def _start_ready(self) -> None:
        """Start ready tasks in new runners (see _next_for_runner)."""
        kept = self._next_for_runner()
        if kept is not None:
            self._new_runner(kept)

    def _kwargs(self, i: int) -> dict[str, Any]:
        """Task ``i``'s arguments: its dependencies' values, by name."""
        tasks, results = self.graph.tasks, self.results
        kwargs = {}  # a loop, not a comprehension: no function object per task
        for d in self.graph.deps[i]:
            name = tasks[d].name
            kwargs[name] = results[name].value
        return kwargs

    def _finish(self, i: int, result: StepResult) -> None:
        """Record task ``i``'s final result; start, skip or halt what follows from it."""
        task = self.graph.tasks[i]
        self._record(i, result)
        if result.state is SUCCEEDED:
            self._release_dependents(i)
        else:
            if result.state is FAILED and not task.detached and self.fail_fast:
                self._halt(i)
            self._skip_descendants(i, result.state)

    def _halt(self, i: int) -> None:
        """Task ``i`` failed under fail_fast: claim nothing new, start no more sync bodies."""
        if self._stopped_by is None:
            self._stopped_by = self.graph.tasks[i].name
            assert self._runners is not None and self._ctx is not None
            self._ctx.slots.halt(self._fail_fast_reason())
            self._runners.start_soon(self._hold_back, i, f"hold back after {self._stopped_by}")

    async def _hold_back(self, i: int) -> None:
        """A runner of its own: the executor holds back the bodies it has not started."""
        assert self._ctx is not None
        await self._ctx.slots.hold_back()

    def _fail_fast_reason(self) -> str:
        return f"fail_fast stopped the run after {self._stopped_by!r} failed"

    def _run_mapped(
        self, task: TaskDef[..., Any], i: int, kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, StepResult]:
        assert self._ctx is not None
        return run_mapped(
            task,
            i,
            kwargs,
            self._ctx,
            fail_fast=self.fail_fast and not task.detached,
            halted=lambda: self._stopped_by is not None and not task.detached,
        )

    def _stop_run(self, exc: BaseException) -> None:
        """KeyboardInterrupt, SystemExit or the like reached a task: end the run, keep ``exc``."""
        if self._interrupt is None:
            self._interrupt = exc
        if self._lanes is not None:
            self._lanes.stop()
        assert self._runners is not None
        self._runners.cancel()

    def _failed_with(self, i: int, exc: BaseException, reason: str) -> StepResult:
        task = self.graph.tasks[i]
        return step_result(task, self._running[i], StepState.FAILED, error=exc, reason=reason)

    def _replayed(self) -> list[tuple[int, StepResult]]:
        """Results the journal holds for tasks without one, in topological order."""
        if self.journal is None:
            return []
        replayed = []
        for i, task in enumerate(self.graph.tasks):
            if task.name not in self.results:
                result = self.journal.cached(i)
                if result is not None:
                    replayed.append((i, result))
        return replayed

    def _release_dependents(self, i: int) -> None:
        for d in self.graph.dependents[i]:
            self._waiting_on[d] -= 1
            if (
                self._waiting_on[d] == 0
                and self.graph.tasks[d].detached == self._phase_detached
                and self.graph.tasks[d].name not in self.results
                and d not in self._running  # a thread lane went on with it
            ):
                self._ready.append(d)  # started by the runner of task i

    def _skip_descendants(self, i: int, state: StepState) -> None:
        """Record every unfinished descendant of ``i`` as SKIPPED, naming its own blocked dependency."""
        stack = [(d, i, state) for d in self.graph.dependents[i]]
        while stack:
            d, blocker, blocker_state = stack.pop()
            if self.graph.tasks[d].name in self.results:
                continue
            reason = f"dependency {self.graph.tasks[blocker].name!r} {blocker_state.value}"
            self._record(d, self._unstarted(d, StepState.SKIPPED, reason))
            stack.extend((dd, d, StepState.SKIPPED) for dd in self.graph.dependents[d])

    def _skip_never_started(self, detached: bool) -> None:
        """After a phase: tasks that never started were held back by fail_fast."""
        reason = f"not started: {self._fail_fast_reason()}"
        for i, task in enumerate(self.graph.tasks):
            if task.detached == detached and task.name not in self.results:
                self._record(i, self._unstarted(i, StepState.SKIPPED, reason))

    def _cancel_unfinished(self, error: BaseException) -> None:
        # Before the run's context exists, `error` kept it from starting (an executor's
        # session or the journal could not open): say so.
        unstarted = _unstarted_reason(error if self._ctx is None else None)
        for i, task in enumerate(self.graph.tasks):
            if task.name in self.results:
                continue
            started_at = self._running.get(i)
            if started_at is None:
                result = self._unstarted(i, StepState.CANCELLED, unstarted)
            else:
                reason = "the run was cancelled while it was running"
                result = step_result(task, started_at, StepState.CANCELLED, reason=reason)
            self._record(i, result)

    def _unstarted(self, i: int, state: StepState, reason: str) -> StepResult:
        task = self.graph.tasks[i]
        return make_result(task.name, state, reason=reason, detached=task.detached)

    def _record(self, i: int, result: StepResult) -> None:
        self.results[result.name] = result
        self.emit(make_finished(result.name, i, len(self.graph.tasks), time.monotonic(), result))

    def _succeeded(self, i: int) -> bool:
        result = self.results.get(self.graph.tasks[i].name)
        return result is not None and result.state is StepState.SUCCEEDED


def _unstarted_reason(error: BaseException | None) -> str:
    """Why a task that never started is CANCELLED: ``error``, the flowing error that kept
    the run from starting (an unreachable cluster, a journal that cannot be written),
    or else a cancellation."""
    if isinstance(error, FlowingError):
        return f"not started: {error}"
    return "the run was cancelled before it started"
