"""One task's run: its gates, then attempts with timeouts and retries with backoff."""

from __future__ import annotations

import contextvars
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._events import Event, TaskRetrying, ThreadAbandoned, make_started
from ._pools import Limits, PoolSlot
from ._results import FAILED, SUCCEEDED, StepResult, StepState, make_result
from ._retry import retry_delay_ms, should_retry
from ._task import TaskDef, call_gate
from ._exceptions import HeldBack
from ._threads import ThreadSlots

if TYPE_CHECKING:
    from ._cache import ResultCache
    from ._executor import BodyRunner
    from ._mapping import MappingMemory


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a task's run needs from the run around it."""

    slots: ThreadSlots
    emit: Callable[[Event], None]
    total: int
    limits: Limits = field(default_factory=Limits)
    cache: ResultCache | None = None  # where @task(cache=True) results live
    runner: BodyRunner | None = None  # the run's executor; None: sync bodies use ``slots``
    # Why no more bodies of a mapped step may start (fail_fast), None while they may.
    mapping_stopped: Callable[[], str | None] | None = None
    # The Flow's memory of its mapped steps since its last run() (None: a fresh one).
    mappings: MappingMemory | None = None

    def held_back(self, task: TaskDef[..., Any]) -> str | None:
        """Why a body of ``task`` that has not started must not start now; None: it may.
        fail_fast spares detached tasks (their mappings never stop by it either)."""
        if task.detached:
            return None
        if self.slots.halt_reason is not None:
            return self.slots.halt_reason
        return self.mapping_stopped() if self.mapping_stopped is not None else None


def step_result(
    task: TaskDef[..., Any],
    started_at: float,
    state: StepState,
    *,
    value: Any = None,
    error: BaseException | None = None,
    attempts: int = 0,
    reason: str | None = None,
) -> StepResult:
    """``task``'s result, finished now, timed from ``started_at``."""
    finished_at = time.monotonic()
    return make_result(
        name=task.name,
        state=state,
        value=value,
        error=error,
        duration_ms=(finished_at - started_at) * 1000,
        attempts=attempts,
        started_at=started_at,
        finished_at=finished_at,
        reason=reason,
        detached=task.detached,
    )


class CallReport(Protocol):
    """What a worker thread reports of one call of a body: it returned ``value`` or
    raised ``error``, between ``started_at`` and ``finished_at``."""

    @property
    def value(self) -> Any: ...
    @property
    def error(self) -> BaseException | None: ...
    @property
    def started_at(self) -> float: ...
    @property
    def finished_at(self) -> float: ...


def call_result(name: str, report: CallReport, *, detached: bool) -> StepResult:
    """The result of a task run as one call of its body in a worker thread, which
    returned a value or raised an ``Exception`` (or the body's own
    ``asyncio.CancelledError``, which the reason names)."""
    error = report.error
    failed = error is not None
    return make_result(
        name,
        FAILED if failed else SUCCEEDED,
        value=None if failed else report.value,
        error=error,
        duration_ms=(report.finished_at - report.started_at) * 1000,
        attempts=1,
        started_at=report.started_at,
        finished_at=report.finished_at,
        reason=UNASKED_CANCELLATION if _is_asyncio_cancellation(error) else None,
        detached=detached,
    )


UNASKED_CANCELLATION = "raised a cancellation nothing had asked for"


def is_cancellation(exc: BaseException, backend_class: type[BaseException]) -> bool:
    """``exc`` is the backend's cancellation, or asyncio's own (which a body may raise on trio)."""
    return isinstance(exc, backend_class) or _is_asyncio_cancellation(exc)


def _is_asyncio_cancellation(exc: BaseException | None) -> bool:
    asyncio = sys.modules.get("asyncio")  # imported by whoever raised one
    return asyncio is not None and isinstance(exc, asyncio.CancelledError)


def waits_only_for_a_thread(task: TaskDef[..., Any]) -> bool:
    """True when ``task``'s run waits for nothing but a worker thread: a sync body
    with no gates, retries, cache, mapping, pool or concurrency limit. The scheduler
    may hold such a task back until a thread is free without delaying anything it
    would await."""
    return not task.is_async and _is_plain(task)


def instances_wait_only_for_a_thread(task: TaskDef[..., Any]) -> bool:
    """True when each instance of the mapped ``task`` waits for nothing but a worker
    thread: a sync body with no gates, retries, timeout, cache, pool or concurrency limit."""
    return not task.is_async and task.timeout_s is None and _has_no_policies(task)


def is_one_async_call(task: TaskDef[..., Any]) -> bool:
    """An async body with nothing around it: no gates, retries, cache, pool or timeout.
    Its run is one await of the body, between ``one_call_started`` and ``one_call_result``
    (or ``one_call_failed``)."""
    return task.is_async and task.timeout_s is None and _is_plain(task)


def _is_plain(task: TaskDef[..., Any]) -> bool:
    return task.map_over is None and _has_no_policies(task)


def _has_no_policies(task: TaskDef[..., Any]) -> bool:
    return not (
        task.cache
        or task.when is not None
        or task.validate is not None
        or task.retry
        or task.retry_until is not None
        or task.pool is not None
        or task.max_concurrency is not None
    )


def run_step(
    task: TaskDef[..., Any], index: int, kwargs: dict[str, Any], ctx: StepContext
) -> Coroutine[Any, Any, StepResult]:
    """Run ``task`` with its dependencies' values: gates first, then the attempts.

    A task without gates or cache gets its attempts' coroutine directly: one frame
    less for each of many waiting tasks to hold, and for the garbage collector to scan.
    """
    if is_one_async_call(task):
        return _one_async_call(task, index, kwargs, ctx)
    if task.when is None and task.validate is None and not (task.cache and ctx.cache is not None):
        return _attempts(task, index, kwargs, ctx, time.monotonic())
    return _gated_step(task, index, kwargs, ctx)


async def _one_async_call(
    task: TaskDef[..., Any], index: int, kwargs: dict[str, Any], ctx: StepContext
) -> StepResult:
    """``_attempts`` for a task that has one attempt and no timeout: the body awaited here.

    It keeps nothing but a float while the body runs (no ``step_result`` partial):
    one object fewer for each of thousands of waiting tasks."""
    started_at = one_call_started(task, index, ctx)
    try:
        return one_call_result(task, started_at, await task.fn(**kwargs))
    except Exception as error:
        return one_call_failed(task, started_at, error)


def one_call_started(task: TaskDef[..., Any], index: int, ctx: StepContext) -> float:
    """The start of a one async call's body (see ``is_one_async_call``): its event; its time."""
    started_at = time.monotonic()
    ctx.emit(make_started(task.name, index, ctx.total, started_at, 1, 1))
    return started_at


def one_call_result(task: TaskDef[..., Any], started_at: float, value: Any) -> StepResult:
    """A one async call's body returned ``value``: SUCCEEDED, unless it is an un-awaited
    coroutine (TypeError: the call failed)."""
    value = refuse_coroutine(task.name, value)
    return step_result(task, started_at, SUCCEEDED, value=value, attempts=1)


def one_call_failed(task: TaskDef[..., Any], started_at: float, error: Exception) -> StepResult:
    """A one async call's body raised ``error``."""
    return step_result(task, started_at, FAILED, error=error, attempts=1)


async def _gated_step(
    task: TaskDef[..., Any], index: int, kwargs: dict[str, Any], ctx: StepContext
) -> StepResult:
    started_at = time.monotonic()
    outcome = functools.partial(step_result, task, started_at)
    if task.when is not None:
        try:
            allowed = bool(await call_gate(task.when, **kwargs))  # a Series has no bool()
        except Exception as error:
            return outcome(StepState.FAILED, error=error, reason="when= raised")
        if not allowed:
            return outcome(StepState.SKIPPED, reason="when= returned a falsy value")
    if task.validate is not None:
        try:
            await call_gate(task.validate, **kwargs)
        except Exception as error:
            return outcome(StepState.FAILED, error=error, reason="validate= rejected the inputs")
    if task.cache and ctx.cache is not None:
        attempts = functools.partial(_attempts, task, index, kwargs, ctx, started_at)
        return await ctx.cache.run(task, kwargs, attempts)
    return await _attempts(task, index, kwargs, ctx, started_at)


async def _attempts(
    task: TaskDef[..., Any],
    index: int,
    kwargs: dict[str, Any],
    ctx: StepContext,
    started_at: float,
) -> StepResult:
    outcome = functools.partial(step_result, task, started_at)
    max_attempts = task.retry + 1
    value: Any = None
    error: Exception | None = None
    for attempt in range(1, max_attempts + 1):
        try:
            held_back = ctx.held_back(task) if attempt > 1 else None
            if held_back is not None:
                raise HeldBack(held_back)  # fail_fast stopped the run during the backoff
            call = _call_with_timeout if task.pool is None else _call_in_pool
            value = await call(task, index, kwargs, ctx, attempt, max_attempts)
        except HeldBack as held:  # fail_fast stopped the run before this body started
            if attempt == 1:  # like every task fail_fast held back: never started, no timing
                reason = f"not started: {held.reason}"
                detached = task.detached
                return make_result(task.name, StepState.SKIPPED, reason=reason, detached=detached)
            return outcome(  # the earlier attempts' outcome stands
                StepState.FAILED,
                value=value,
                error=error,
                attempts=attempt - 1,
                reason=f"not retried: {held.reason}",
            )
        except Exception as exc:
            value, error = None, exc
        else:
            error = None
            if task.retry_until is None:
                return outcome(StepState.SUCCEEDED, value=value, attempts=attempt)
            try:
                accepted = bool(await call_gate(task.retry_until, value))
            except Exception as exc:
                return outcome(
                    StepState.FAILED,
                    value=value,
                    error=exc,
                    attempts=attempt,
                    reason="retry_until= raised",
                )
            if accepted:
                return outcome(StepState.SUCCEEDED, value=value, attempts=attempt)
        if attempt < max_attempts and not should_retry(task, error):
            return outcome(
                StepState.FAILED, error=error, attempts=attempt, reason="not in retry_on"
            )
        if attempt < max_attempts:
            delay_ms = retry_delay_ms(task, attempt, error)
            ctx.emit(
                TaskRetrying(
                    task.name, index, ctx.total, time.monotonic(), attempt, max_attempts, error, delay_ms
                )
            )
            await anyio.sleep(delay_ms / 1000)
    if error is not None:
        return outcome(StepState.FAILED, error=error, attempts=max_attempts)
    return outcome(
        StepState.FAILED,
        value=value,
        attempts=max_attempts,
        reason=f"retry_until= rejected the value of all {max_attempts} attempt(s)",
    )


async def _call_in_pool(
    task: TaskDef[..., Any],
    index: int,
    kwargs: dict[str, Any],
    ctx: StepContext,
    attempt: int,
    max_attempts: int,
) -> Any:
    """One attempt of a task with a pool: it starts once the pool lets it."""
    assert task.pool is not None
    async with ctx.limits.hold(task.pool) as slot:
        held_back = ctx.held_back(task)
        if held_back is not None:
            raise HeldBack(held_back)  # fail_fast stopped the run while it waited
        return await _call_with_timeout(task, index, kwargs, ctx, attempt, max_attempts, slot)


async def _call_with_timeout(
    task: TaskDef[..., Any],
    index: int,
    kwargs: dict[str, Any],
    ctx: StepContext,
    attempt: int,
    max_attempts: int,
    slot: PoolSlot | None = None,
) -> Any:
    """One attempt: its start event, then its body under the task's timeout."""
    if not task.is_async and (ctx.runner is None or task.local):
        return await _in_a_thread(task, index, kwargs, ctx, attempt, max_attempts, slot)
    ctx.emit(make_started(task.name, index, ctx.total, time.monotonic(), attempt, max_attempts))
    if task.is_async:
        return await _timed(task, attempt, max_attempts, functools.partial(task.fn, **kwargs))
    assert ctx.runner is not None
    run_remotely = functools.partial(
        ctx.runner.run, task, kwargs, _abandoned(task, index, ctx, attempt)
    )
    return await _timed(task, attempt, max_attempts, run_remotely)


async def _in_a_thread(
    task: TaskDef[..., Any],
    index: int,
    kwargs: dict[str, Any],
    ctx: StepContext,
    attempt: int,
    max_attempts: int,
    slot: PoolSlot | None,
) -> Any:
    """A sync body's attempt in one of the run's threads. It waits for a thread first:
    that wait is no part of its timeout, and its start event comes once it has one."""

    def call_in_thread() -> Any:
        try:
            held_back = ctx.held_back(task)
            if held_back is not None:
                raise HeldBack(held_back)  # the run or the mapping stopped as it got a thread
            return refuse_coroutine(task.name, task.fn(**kwargs))  # closed even if abandoned
        finally:
            if slot is not None:
                slot.thread_returned()

    report_abandoned = _abandoned(task, index, ctx, attempt)

    def abandoned_here() -> None:
        if slot is not None:
            slot.abandon()  # the thread keeps its pool slot until the function returns
        report_abandoned()

    reserved = await ctx.slots.reserve(call_in_thread)
    try:
        held_back = ctx.held_back(task)
        if held_back is not None:
            raise HeldBack(held_back)  # fail_fast stopped the run while it waited
        ctx.emit(make_started(task.name, index, ctx.total, time.monotonic(), attempt, max_attempts))
    except BaseException:  # held back, or an event observer raised KeyboardInterrupt
        ctx.slots.release(reserved)
        raise
    # From here ThreadSlots.call owns the token: it gives it back however it ends.
    call = functools.partial(ctx.slots.call, reserved, abandoned_here)
    return await _timed(task, attempt, max_attempts, call)


async def _timed(
    task: TaskDef[..., Any], attempt: int, max_attempts: int, body: Callable[[], Awaitable[Any]]
) -> Any:
    """Await ``body()`` under the task's timeout; its value, refused if a coroutine."""
    if task.timeout_s is None:  # no cancel scope to pay for
        return refuse_coroutine(task.name, await body())
    with anyio.move_on_after(task.timeout_s):
        return refuse_coroutine(task.name, await body())
    raise TimeoutError(
        f"task {task.name!r} timed out after {task.timeout_s:g} s "
        f"(attempt {attempt} of {max_attempts})"
    )


def _abandoned(task: TaskDef[..., Any], index: int, ctx: StepContext, attempt: int) -> Callable[[], None]:
    """What reports that a sync body of ``task`` was abandoned after a timeout or cancellation."""

    def report() -> None:
        ctx.emit(ThreadAbandoned(task.name, index, ctx.total, time.monotonic(), attempt))

    return report


def refuse_coroutine(name: str, value: Any) -> Any:
    """A body that returns an un-awaited coroutine is a bug in task ``name``: say so."""
    if isinstance(value, CoroutineType):  # inspect.iscoroutine, without its call
        value.close()
        raise TypeError(
            f"task {name!r} returned an un-awaited coroutine; await it in the body, "
            f"which must be an 'async def' function to do so"
        )
    return value


def call_in_context(
    name: str, fn: Callable[..., Any], kwargs: dict[str, Any], context: contextvars.Context
) -> tuple[Any, BaseException | None]:
    """In a worker thread: task ``name``'s sync body, called in a copy of ``context``.
    Returns its value and None, or None and what it raised (the caller decides what
    that means)."""
    try:
        return refuse_coroutine(name, context.copy().run(fn, **kwargs)), None
    except BaseException as error:
        return None, error


def stops_the_run(error: BaseException) -> bool:
    """What a sync body raised is KeyboardInterrupt, SystemExit or the like: no
    failure of its task but the end of the run. Its own ``asyncio.CancelledError``
    is a failure: nobody cancelled a thread."""
    return not isinstance(error, Exception) and not _is_asyncio_cancellation(error)
