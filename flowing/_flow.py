"""Flow: the public facade. ``run()`` blocks on ``arun()``; the scheduler does the work.

The rest of the engine is imported inside the methods that use it: the graph
and the event stream when a Flow is built, the scheduler, progress and signals
when it runs, the journal, tracing, an executor and the renderers only when asked
for. ``import flowing`` thus loads only what declaring tasks needs;
tests/test_exports.py checks it.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from ._exceptions import (
    FlowAlreadyRunningError,
    FlowDefinitionError,
    FlowTimeoutError,
    StepNotSucceededError,
    TaskNotRunError,
)
from ._pools import Pool, check_pool_names, check_pools
from ._results import StepResult, StepState, format_summary
from ._task import TaskDef, check_flag, needs_an_instance

if TYPE_CHECKING:
    from ._executor import Executor
    from ._journal import Journal, JournalRun
    from ._mapping import MappingMemory
    from ._scheduler import Scheduler
    from ._serializers import Serializer
    from ._stream import EventStream, OnEvent

T = TypeVar("T")
Backend = Literal["asyncio", "trio"]
_BACKENDS = ("asyncio", "trio")
EVENTS_BUFFER = 10_000
"""``events()``'s default buffer, ``_stream.DEFAULT_BUFFER`` (a test keeps them equal)."""


class Flow:
    """A graph of tasks collected backwards from ``terminals``, ready to run.

    Detached tasks whose dependencies are all in the graph join it on their own.
    With ``journal_path``, every success is appended to that file as it happens
    and later runs, in any process, replay it instead of running the task again
    (see the README's "Durable journal"). ``on_event`` receives every event of every
    run; ``tracing=True`` records OpenTelemetry spans (``pip install 'flowing[otel]'``).
    """

    def __init__(
        self,
        *terminals: TaskDef[..., Any],
        max_workers: int = 5,
        fail_fast: bool = True,
        on_event: OnEvent | None = None,
        tracing: bool = False,
        pools: Mapping[str, Pool | int] | None = None,
        journal_path: str | os.PathLike[str] | None = None,
        serializer: Literal["pickle", "json"] | Serializer = "pickle",
        journal_fsync: bool = False,
        executor: Executor | None = None,
    ) -> None:
        from ._graph import build_graph
        from ._serializers import resolve_serializer
        from ._stream import Broadcaster
        from ._recorder import RunRecorder

        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise FlowDefinitionError(f"max_workers must be an int >= 1, got {max_workers!r}")
        if on_event is not None:
            _check_on_event(on_event)
        if executor is not None:
            from ._executor import ThreadExecutor, is_executor

            if needs_an_instance(executor, "session"):
                raise FlowDefinitionError(
                    f"executor is the class {executor.__name__}; pass an instance: "
                    f"executor={executor.__name__}(...)"
                )
            if not is_executor(executor):
                raise FlowDefinitionError(
                    f"executor must be an Executor such as ThreadExecutor() or "
                    f"flowing.dask.DaskExecutor(address), got {executor!r}"
                )
            # The default spelled out is the default: the scheduler's own thread path.
            if isinstance(executor, ThreadExecutor):
                executor = None
        self.executor = executor
        self._graph = build_graph(terminals)
        self.pools = check_pools(pools)
        check_pool_names(self._graph.tasks, self.pools)
        self.max_workers = max_workers
        self.fail_fast = check_flag("fail_fast", fail_fast, FlowDefinitionError)
        self._results: dict[str, StepResult] = {}
        self._overrides: dict[str, StepResult] = {}
        self._cache: dict[str, Any] = {}  # @task(cache=True) results, for the Flow's life
        # Its mapped steps' elements and instances since the last run(), for resume().
        self._mappings: MappingMemory | None = None
        self._run_lock = threading.Lock()
        self._events = Broadcaster(on_event)
        self._recorder = RunRecorder()
        self._events.add(self._recorder, "run recorder", guard=False)  # cannot raise
        if check_flag("tracing", tracing, FlowDefinitionError):
            from ._otel import SpanRecorder

            self._events.add(SpanRecorder(), "OpenTelemetry spans")
        check_flag("journal_fsync", journal_fsync, FlowDefinitionError)
        chosen = resolve_serializer(serializer)
        self._journal: Journal | None = None
        if journal_path is not None:
            from ._journal import Journal

            self._journal = Journal(journal_path, chosen, journal_fsync)

    @property
    def tasks(self) -> tuple[TaskDef[..., Any], ...]:
        """Every task of the flow, dependencies before dependents."""
        return self._graph.tasks

    @property
    def results(self) -> dict[str, StepResult]:
        """A copy of the latest result of every task that has one, in graph order."""
        return self._ordered(self._results)

    @property
    def detached_failures(self) -> dict[str, StepResult]:
        """Results of detached tasks that failed in the latest run."""
        return {
            name: r
            for name, r in self.results.items()
            if r.detached and r.state is StepState.FAILED
        }

    def run(
        self,
        *,
        backend: Backend = "asyncio",
        timeout_s: float | None = None,
        fresh: bool = False,
        progress: bool = False,
    ) -> dict[str, StepResult]:
        """Run every task (keeping overrides) and block until done; returns all results.

        Tasks the journal holds are replayed; ``fresh=True`` empties the journal first.
        ``progress=True`` shows live progress on stderr (see the README).
        """
        run = functools.partial(self.arun, timeout_s=timeout_s, fresh=fresh, progress=progress)
        return self._block_on(run, backend, progress)

    async def arun(
        self, *, timeout_s: float | None = None, fresh: bool = False, progress: bool = False
    ) -> dict[str, StepResult]:
        """Async twin of :meth:`run`, for use inside an async app."""
        return await self._execute(
            dict(self._overrides), timeout_s, fresh=fresh, progress=progress
        )

    def resume(
        self,
        *,
        backend: Backend = "asyncio",
        timeout_s: float | None = None,
        progress: bool = False,
    ) -> dict[str, StepResult]:
        """Re-run every task that did not succeed last time; keep the ones that did."""
        run = functools.partial(self.aresume, timeout_s=timeout_s, progress=progress)
        return self._block_on(run, backend, progress)

    async def aresume(
        self, *, timeout_s: float | None = None, progress: bool = False
    ) -> dict[str, StepResult]:
        """Async twin of :meth:`resume`."""
        kept = {name: r for name, r in self._results.items() if r.succeeded}
        return await self._execute(kept, timeout_s, progress=progress, resuming=True)

    @overload
    def override(self, task: TaskDef[..., Coroutine[Any, Any, T]], value: T) -> None: ...

    @overload
    def override(self, task: TaskDef[..., T], value: T) -> None: ...

    def override(self, task: TaskDef[..., Any], value: Any) -> None:
        """Record ``value`` as ``task``'s SUCCEEDED result, for this and later runs; the
        results its earlier value reached downstream are forgotten, so resume() redoes them."""
        name = self._name_in_flow(task, "override")
        self._refuse_while_running(f"override({name!r}, ...)")
        self._forget_downstream(task)
        result = StepResult(
            name, StepState.SUCCEEDED, value=value, reason="overridden", detached=task.detached
        )
        self._overrides[name] = result
        self._results[name] = result

    def clear_override(self, task: TaskDef[..., Any]) -> None:
        """Forget ``task``'s override (if it has one) and the results its value reached
        downstream: the next ``run()`` or ``resume()`` runs them again."""
        name = self._name_in_flow(task, "clear_override")
        self._refuse_while_running(f"clear_override({name!r})")
        if self._overrides.pop(name, None) is not None:
            self._results.pop(name, None)
            self._forget_downstream(task)

    def _forget_downstream(self, task: TaskDef[..., Any]) -> None:
        """Forget the results ``task``'s value reached: its descendants', down to (not
        through) overridden tasks, and what its mapped dependents remember."""
        if self._mappings is not None:  # the value may be the same object, changed in place
            self._mappings.kept.clear()
        graph = self._graph
        forgotten: set[int] = set()
        stack = list(graph.dependents[graph.index[task]])
        while stack:
            i = stack.pop()
            name = graph.tasks[i].name
            if i not in forgotten and name not in self._overrides:
                forgotten.add(i)
                self._results.pop(name, None)
                stack.extend(graph.dependents[i])

    def _refuse_while_running(self, call: str) -> None:
        if self._run_lock.locked():
            raise FlowAlreadyRunningError(
                f"this Flow is running: {call} would change a result under it; "
                f"call it before run() or once it has returned"
            )

    @overload
    def value(self, task: TaskDef[..., Coroutine[Any, Any, T]]) -> T: ...

    @overload
    def value(self, task: TaskDef[..., T]) -> T: ...

    def value(self, task: TaskDef[..., Any]) -> Any:
        """The value of a task that succeeded; a clear error for any other task."""
        if not isinstance(task, (TaskDef, str)):
            raise TypeError(f"value() takes a task of this flow, got {task!r}")
        if not isinstance(task, TaskDef) or task not in self._graph.index:
            raise TaskNotRunError(str(getattr(task, "name", task)), self._not_in_flow(task, "value"))
        name = task.name
        result = self._results.get(name)
        if result is None:
            raise TaskNotRunError(name, "has not run yet; call run() first")
        if result.state is not StepState.SUCCEEDED:
            raise StepNotSucceededError(
                name, result.state, result.reason, result.error
            ) from result.error
        return result.value

    def events(self, *, buffer: int = EVENTS_BUFFER) -> EventStream:
        """An async iterator over the events of the next (or current) run, ending with it.

        Subscribes at once, so call it before starting the run. At most ``buffer``
        events wait for a slow consumer; beyond that the oldest are discarded and
        counted in ``.dropped``, the run never waits.
        """
        return self._events.subscribe(buffer)

    def step_keys(self) -> dict[str, str | None]:
        """Each task's step key (None: not cacheable), as a journal would use it."""
        from ._journal import step_keys

        keys = step_keys(self._graph, set(self._overrides))
        return {t.name: key for t, key in zip(self._graph.tasks, keys)}

    def summary(self) -> str:
        """A readable table of the latest results: state, task, duration, attempts, error."""
        return format_summary(self.results.values())

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart; after a run, nodes are coloured by state."""
        from ._render import to_mermaid

        return to_mermaid(self._graph, self._results)

    def to_dot(self) -> str:
        """The graph as Graphviz DOT text; after a run, nodes are coloured by state."""
        from ._render import to_dot

        return to_dot(self._graph, self._results)

    def timeline(self, path: str | os.PathLike[str] | None = None) -> str:
        """The latest run as Mermaid ``gantt`` text, critical path tagged ``crit``.

        With ``path`` ending in .png, .svg or .pdf, also draws it with matplotlib
        (``pip install 'flowing[plot]'``); with .mmd, .md or .txt, writes the text.
        """
        from ._timeline import timeline

        return timeline(self._recorder, self._graph, path)

    def __repr__(self) -> str:
        return f"<Flow of {len(self._graph)} tasks>"

    async def _execute(
        self,
        kept: dict[str, StepResult],
        timeout_s: float | None,
        *,
        fresh: bool = False,
        progress: bool = False,
        resuming: bool = False,
    ) -> dict[str, StepResult]:
        _check_timeout(timeout_s)
        check_flag("fresh", fresh, ValueError)
        check_flag("progress", progress, ValueError)
        import anyio

        from ._mapping import MappingMemory
        from ._progress import showing_progress

        if not self._run_lock.acquire(blocking=False):
            raise FlowAlreadyRunningError()
        try:
            self._results = kept
            if self._mappings is None or not resuming:  # a new run maps over new values
                self._mappings = MappingMemory()
            if fresh:
                self._cache.clear()  # a fresh run replays nothing, cached inputs included
            journal = None
            if self._journal is not None:
                try:
                    journal = await self._journal.open_run(
                        self._graph, set(self._overrides), set(kept), fresh=fresh
                    )
                except BaseException as error:  # the run ends before it starts: say so
                    self._scheduler(None).cancel_before_start(error)
                    raise
            scheduler = self._scheduler(journal)
            with showing_progress(self._events, self._recorder, progress):
                async with self._events.delivering(timeout_s):
                    with anyio.move_on_after(timeout_s) as deadline:
                        await scheduler.run()
            results = self.results
            if deadline.cancelled_caught:
                unfinished = [n for n, r in results.items() if r.state is StepState.CANCELLED]
                if unfinished:  # else the deadline came once all had finished
                    raise FlowTimeoutError(timeout_s or 0.0, unfinished)
            return results
        finally:
            self._run_lock.release()

    def _scheduler(self, journal: JournalRun | None) -> Scheduler:
        """A scheduler for one run, recording into this flow's results."""
        from ._scheduler import Scheduler

        return Scheduler(
            self._graph,
            self._results,
            max_workers=self.max_workers,
            fail_fast=self.fail_fast,
            emit=self._events.emit,
            pools=self.pools,
            journal=journal,
            executor=self.executor,
            cache=self._cache,
            mappings=self._mappings,
        )

    def _block_on(
        self, run: Callable[[], Awaitable[dict[str, StepResult]]], backend: Backend, progress: bool
    ) -> dict[str, StepResult]:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        from ._preload import import_run_modules

        # Imported now, none is left for a Ctrl-C to interrupt inside the loop.
        import_run_modules(backend, progress is True)
        if _event_loop_running_here():
            # Jupyter or an async app called the blocking API: give the flow its
            # own loop in a helper thread rather than nesting loops.
            from ._signals import CancellableRun

            cancellable = CancellableRun(run)
            from concurrent.futures import ThreadPoolExecutor, wait  # the rare path

            with ThreadPoolExecutor(1, thread_name_prefix="flowing-run") as pool:
                future = pool.submit(_run_on_new_loop, cancellable, backend)
                try:
                    while not future.done():  # short waits: a signal another thread
                        wait([future], timeout=0.1)  # caught still reaches this one
                    return future.result()
                except BaseException:
                    cancellable.cancel()  # Ctrl-C in Jupyter: wind the run down, then raise
                    raise
        return _run_on_new_loop(run, backend)

    def _ordered(self, results: Mapping[str, StepResult]) -> dict[str, StepResult]:
        return {t.name: results[t.name] for t in self._graph.tasks if t.name in results}

    def _name_in_flow(self, task: TaskDef[..., Any], method: str) -> str:
        if not isinstance(task, (TaskDef, str)):
            raise FlowDefinitionError(f"{method}() takes a task of this flow, got {task!r}")
        if not isinstance(task, TaskDef) or task not in self._graph.index:
            why = self._not_in_flow(task, method)
            raise FlowDefinitionError(f"task {getattr(task, 'name', task)!r} {why}")
        return task.name

    def _not_in_flow(self, task: TaskDef[..., Any] | str, method: str) -> str:
        """Why ``task`` (not one of this flow's tasks) cannot be looked up."""
        if isinstance(task, str) and any(t.name == task for t in self._graph.tasks):
            return (
                f"was given by name: {method}() takes the task itself, as passed to "
                f"Flow(...) or depends_on (by name: flow.results[{task!r}])"
            )
        return "is not part of this flow"


def _run_on_new_loop(
    run: Callable[[], Awaitable[dict[str, StepResult]]], backend: Backend
) -> dict[str, StepResult]:
    import anyio

    from ._signals import run_on_asyncio

    if backend == "asyncio":
        return run_on_asyncio(run)
    # trio keeps its run's outcome in a reference cycle until the garbage collector
    # runs: let that outcome be None, not the results and every value in them.
    results: list[dict[str, StepResult]] = []

    async def run_and_keep() -> None:
        results.append(await run())

    anyio.run(run_and_keep, backend=backend)
    return results[0]


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and (
        isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0
    ):
        raise ValueError(f"timeout_s must be None or a number > 0, got {timeout_s!r}")


def _check_on_event(on_event: object) -> None:
    """``on_event`` is called with each event: refuse what could never take one."""
    if not callable(on_event):
        raise FlowDefinitionError(f"on_event must be a callable taking an event, got {on_event!r}")
    import inspect

    try:  # a wrapper's own signature: a decorator may supply the wrapped one's arguments
        signature = inspect.signature(on_event, follow_wrapped=False)
    except (TypeError, ValueError):
        return  # builtins and some C callables have no signature: trust the user
    try:
        signature.bind(None)
    except TypeError as error:
        raise FlowDefinitionError(
            f"on_event must take the event as its one argument, but {error}: "
            f"{on_event!r} would fail on every event"
        ) from None


def _event_loop_running_here() -> bool:
    # Through sys.modules: `import flowing` stays free of asyncio and trio, and a
    # loop of a library that was never imported cannot be running.
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and asyncio._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    in_trio_run = getattr(getattr(trio, "lowlevel", None), "in_trio_run", None)
    return in_trio_run is not None and bool(in_trio_run())
