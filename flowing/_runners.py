"""The scheduler's runner tasks: started cheaply, cancelled together.

anyio's task group wraps every child in a task handle with its own cancel scope
and event, about 30 µs a task, which dominates a flow of many small async tasks.
On asyncio the runners are plain asyncio tasks instead, which anyio counts as
children of one cancel scope, as its own task group does with its children: cancel
scopes, shields and deadlines inside them behave as in any anyio task, and a
cancellation from outside reaches them. That bookkeeping is anyio's private API
(``_task_states``, the WeakKeyDictionary's own entries, and a scope's ``_tasks``);
when an anyio release lacks it, on trio, and on a loop with a task factory, the
runners use an anyio task group.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    import asyncio

Runner = Callable[[int], Coroutine[Any, Any, None]]

# How many runners the scheduler (and a mapped step) lets wait to begin at once,
# beyond those that began and wait for something (see Scheduler._next_for_runner).
BEGIN_AHEAD = 64


class Runners(Protocol):
    """Where the scheduler starts its runners; leaving the block waits for all of them.

    A runner lets out nothing but a cancellation: on asyncio, a KeyboardInterrupt or
    SystemExit that leaves a task breaks the event loop. An Exception it lets out is
    a bug, raised from the block.
    """

    def start_soon(self, runner: Runner, i: int, name: str) -> None: ...

    def cancel(self) -> None:
        """Cancel every runner, started or not."""


@asynccontextmanager
async def open_runners() -> AsyncIterator[Runners]:
    """A group of runners that all end, finished or cancelled, before the block is left."""
    loop = running_asyncio_loop()
    states = _AnyioTaskStates.find() if loop is not None else None
    # A task factory (such as asyncio's eager one) may run a task before it can be
    # adopted: anyio's task group knows how to spawn there.
    if loop is None or states is None or loop.get_task_factory() is not None:
        try:
            async with anyio.create_task_group() as tg:
                yield _TaskGroupRunners(tg)
        except BaseExceptionGroup as group:
            # What one runner let out (e.g. KeyboardInterrupt from an event observer),
            # or trio's Ctrl-C delivered to the waiting group: raised as it is, as on asyncio.
            lone = _lone_exception(group)
            if lone is group:
                raise
            raise lone from None
        return
    scope = anyio.CancelScope()
    runners = _AsyncioRunners(loop, scope, states)
    try:
        with scope:
            try:
                yield runners
            except BaseException as exc:
                runners.cancel()
                with anyio.CancelScope(shield=True):
                    await runners.all_done()
                if runners.error is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                    # Both, as a task group raises them: neither hides the other.
                    raise BaseExceptionGroup("open_runners", [exc, runners.error]) from None
                raise
            await runners.all_done()
    except anyio.get_cancelled_exc_class():
        if runners.error is None:
            raise
    if runners.error is not None:  # a bug outranks the cancellation it met, as in a task group
        raise runners.error


class _TaskGroupRunners:
    def __init__(self, tg: TaskGroup) -> None:
        self._tg = tg

    def start_soon(self, runner: Runner, i: int, name: str) -> None:
        self._tg.start_soon(runner, i, name=name)

    def cancel(self) -> None:
        self._tg.cancel_scope.cancel()


class _AnyioTaskStates:
    """anyio's record of which cancel scope each asyncio task runs in (private API).

    anyio keeps it in a ``WeakKeyDictionary``. Adopting and releasing write to that
    dictionary's own ``data`` (a weak reference to the task -> its state) as its
    ``__setitem__`` and ``pop`` do, without their two Python-level calls per runner
    (0.7 of the 1.0 µs the pair costs on Python 3.11). A released task is alive, so
    none of the dictionary's pending removals (kept while it is iterated) is its.
    """

    def __init__(
        self,
        states: weakref.WeakKeyDictionary[Any, Any],
        state_class: Callable[[int | None, Any], Any],
    ) -> None:
        self._entries: dict[weakref.ref[Any], Any] = states.data  # type: ignore[attr-defined]
        self._remove = states._remove  # type: ignore[attr-defined]  # drops a dead task's entry
        self._state_class = state_class

    @classmethod
    def find(cls) -> _AnyioTaskStates | None:
        """anyio's task states, or None when this anyio release keeps them otherwise."""
        backend = sys.modules.get("anyio._backends._asyncio")
        states = getattr(backend, "_task_states", None)
        state_class = getattr(backend, "TaskState", None)
        scope_class = getattr(backend, "CancelScope", None)
        if state_class is None or not hasattr(scope_class, "_tasks"):
            return None
        if not isinstance(states, weakref.WeakKeyDictionary) or not _has_own_entries(states):
            return None
        try:
            probe = state_class(None, None)
        except TypeError:  # TaskState takes other arguments now
            return None
        if not hasattr(probe, "cancel_scope"):
            return None
        return cls(states, state_class)

    def adopt(self, task: asyncio.Task[None], scope: anyio.CancelScope, parent_id: int) -> None:
        """Have anyio count ``task`` as running directly in ``scope``."""
        self._entries[weakref.ref(task, self._remove)] = self._state_class(parent_id, scope)
        scope._tasks.add(task)  # type: ignore[attr-defined]

    def release(self, task: asyncio.Task[None], scope: anyio.CancelScope) -> None:
        scope._tasks.discard(task)  # type: ignore[attr-defined]
        self._entries.pop(weakref.ref(task), None)


def _has_own_entries(states: weakref.WeakKeyDictionary[Any, Any]) -> bool:
    """``states`` keeps its entries as CPython's WeakKeyDictionary does."""
    entries, remove = getattr(states, "data", None), getattr(states, "_remove", None)
    return isinstance(entries, dict) and callable(remove)


class _AsyncioRunners:
    """Runners as asyncio tasks that anyio counts as children of ``scope``, which
    the block's own task is in; ``cancel()`` cancels that scope.

    Each task runs its runner's coroutine directly and reports its end in a done
    callback, as anyio's task group does: no wrapper coroutine for each of
    thousands of waiting tasks to hold. The callback and its context are made
    once, not per task.

    Invariant: ``_tasks`` holds every runner task that has not finished (asyncio
    itself keeps only weak references to tasks).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, scope: anyio.CancelScope, states: _AnyioTaskStates
    ) -> None:
        self._loop = loop
        self._scope = scope
        self._states = states
        self._parent_id = id(_current_task(loop))
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None  # the first one a runner let out
        self._idle: anyio.Event | None = None  # set when the last runner finishes
        self._on_done = self._finished  # one bound method for every task
        self._callback_context = contextvars.Context()

    def start_soon(self, runner: Runner, i: int, name: str) -> None:
        if self._scope.cancel_called:
            return  # a cancelled group begins nothing
        task = self._loop.create_task(runner(i), name=name)
        self._states.adopt(task, self._scope, self._parent_id)
        self._tasks.add(task)
        task.add_done_callback(self._on_done, context=self._callback_context)

    def cancel(self) -> None:
        """Cancel the scope, and the runners that have not begun: anyio delivers a
        cancellation only once a task has begun, and none of them would have begun
        on asyncio's own."""
        self._scope.cancel()
        for task in self._tasks:
            if _not_begun(task):
                task.cancel()

    async def all_done(self) -> None:
        """Wait for every runner. Cancelled meanwhile, cancel them all, wait for them
        still, then re-raise: as an anyio task group does, even when asyncio's own
        ``Task.cancel()`` (which no anyio shield stops) arrives again and again."""
        cancelled: BaseException | None = None
        while self._tasks:
            self._idle = anyio.Event()
            try:
                with anyio.CancelScope(shield=cancelled is not None):
                    await self._idle.wait()
            except BaseException as exc:  # a cancellation: the runners end first
                cancelled = cancelled or exc
                self.cancel()
        if cancelled is not None:
            raise cancelled
        # A runner that ended at a cancellation may have woken this task before
        # anyio's cancel delivery reached it (it skips the task that called cancel()).
        await anyio.lowlevel.checkpoint_if_cancelled()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._states.release(task, self._scope)
        if not task.cancelled():
            error = task.exception()
            if error is not None:  # a runner lets nothing out: a bug, raise it
                self.error = self.error or error
                self.cancel()
        self._tasks.discard(task)
        if not self._tasks and self._idle is not None:
            self._idle.set()


def _not_begun(task: asyncio.Task[None]) -> bool:
    coro = task.get_coro()
    return isinstance(coro, Coroutine) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED


def _lone_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The only exception inside ``group`` (nested groups flattened), else ``group``."""
    current: BaseException = group
    while isinstance(current, BaseExceptionGroup) and len(current.exceptions) == 1:
        current = current.exceptions[0]
    return group if isinstance(current, BaseExceptionGroup) else current


def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
    """The asyncio task running in ``loop``, the running loop (asyncio is imported
    by whoever runs it: this module does not import it)."""
    task: asyncio.Task[None] = sys.modules["asyncio"].current_task(loop)
    return task


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None on trio."""
    module = sys.modules.get("asyncio")  # imported by whoever runs the loop
    if module is None:
        return None
    try:
        loop: asyncio.AbstractEventLoop = module.get_running_loop()
        return loop
    except RuntimeError:  # trio
        return None
