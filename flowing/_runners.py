"""The scheduler's runner tasks: started cheaply, cancelled together.

anyio's task group wraps every child in a task handle with its own cancel scope
and event, about 30 µs a task, which dominates a flow of many small async tasks.
On asyncio the runners are plain asyncio tasks instead, each inside its own anyio
cancel scope (about a third of the cost): cancel scopes, shields and deadlines
inside them behave as in any anyio task. On trio they use an anyio task group.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup

if TYPE_CHECKING:
    import asyncio

Runner = Callable[[int], Coroutine[Any, Any, None]]


class Runners(Protocol):
    """Where the scheduler starts its runners; leaving the block waits for all of them."""

    def start_soon(self, runner: Runner, i: int, name: str) -> None: ...

    def cancel(self) -> None:
        """Cancel every runner, started or not."""


@asynccontextmanager
async def open_runners() -> AsyncIterator[Runners]:
    """A group of runners that all end, finished or cancelled, before the block is left."""
    loop = running_asyncio_loop()
    if loop is None:
        async with anyio.create_task_group() as tg:
            yield _TaskGroupRunners(tg)
        return
    runners = _AsyncioRunners(loop)
    try:
        yield runners
    except BaseException:
        runners.cancel()
        with anyio.CancelScope(shield=True):
            await runners.all_done()
        raise
    await runners.all_done()


class _TaskGroupRunners:
    def __init__(self, tg: TaskGroup) -> None:
        self._tg = tg

    def start_soon(self, runner: Runner, i: int, name: str) -> None:
        self._tg.start_soon(runner, i, name=name)

    def cancel(self) -> None:
        self._tg.cancel_scope.cancel()


class _AsyncioRunners:
    """Runners as asyncio tasks, each under an anyio cancel scope that ``cancel()`` cancels.

    Invariants: ``_tasks`` holds every runner task that has not finished (asyncio
    itself keeps only weak references to tasks); ``_scopes`` the cancel scopes of
    those that have begun.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()
        self._scopes: set[anyio.CancelScope] = set()
        self._cancelled = False
        self._error: BaseException | None = None  # the first one a runner let out
        self._idle: anyio.Event | None = None  # set when the last runner finishes
        # anyio.CancelScope() looks up the backend and initialises the backend's scope
        # twice (about 2.6 µs); that class called directly gives the same scope in 0.7 µs.
        self._new_scope: Callable[[], anyio.CancelScope] = type(anyio.CancelScope())

    def start_soon(self, runner: Runner, i: int, name: str) -> None:
        task = self._loop.create_task(self._run(runner, i), name=name)
        if not task.done():  # an eager task factory (Python 3.12+) may have run it all
            self._tasks.add(task)

    def cancel(self) -> None:
        self._cancelled = True
        for scope in list(self._scopes):
            scope.cancel()

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
        if self._error is not None:
            raise self._error

    async def _run(self, runner: Runner, i: int) -> None:
        try:
            if self._cancelled:
                return
            with self._new_scope() as scope:
                self._scopes.add(scope)
                try:
                    await runner(i)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as error:  # a runner lets nothing out: a bug, raise it
                    self._error = self._error or error
                    self.cancel()
                finally:
                    self._scopes.discard(scope)
        finally:  # here rather than in a done callback: no callback object per task
            self._tasks.discard(_current_task())
            if not self._tasks and self._idle is not None:
                self._idle.set()


def _current_task() -> asyncio.Task[None]:
    """The running asyncio task (only called where asyncio runs)."""
    task: asyncio.Task[None] = sys.modules["asyncio"].current_task()
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
