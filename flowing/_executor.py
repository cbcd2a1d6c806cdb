"""Where a sync task body runs: the executor seam.

An ``Executor`` is opened once per run with that run's in-process thread budget
and yields a ``BodyRunner`` that runs each sync body. Two implementations:
``ThreadExecutor`` (the default, worker threads of this process) and
``flowing.dask.DaskExecutor`` (a Dask cluster). Async bodies, gates and tasks
declared ``@task(local=True)`` never go through an executor.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ._attempt import refuse_coroutine
from ._task import TaskDef


class BodyRunner(Protocol):
    """Runs the sync bodies of one run."""

    async def run(
        self, task: TaskDef[..., Any], kwargs: dict[str, Any], on_abandon: Callable[[], None]
    ) -> Any:
        """Return ``task.fn(**kwargs)``; when cancelled, stop or abandon the call and re-raise.

        ``on_abandon`` is called when a cancelled call keeps running unwatched. A
        runner that holds back a body fail_fast stopped before it started raises
        ``HeldBack`` instead (see ``Executor.session``).
        """
        ...


class RunThreads(Protocol):
    """What an executor gets of the run it serves: the run's in-process worker threads
    (at most ``max_workers`` busy) and its fail_fast halt."""

    @property
    def halt_reason(self) -> str | None:
        """Why fail_fast stopped the run, once it has: from then on a runner raises
        ``HeldBack(halt_reason)`` for every body it has not started."""

    async def run(self, fn: Callable[[], Any], on_abandon: Callable[[], None]) -> Any:
        """Return ``fn()``, called in one of the run's worker threads; when cancelled,
        abandon the thread (``on_abandon`` is called) and re-raise."""
        ...

    def on_halt(self, hook: Callable[[str], Awaitable[None]]) -> None:
        """Have ``hook(halt_reason)`` awaited once fail_fast stops the run; it must not raise."""

    def on_mapping_halt(self, hook: Callable[[str, str], Awaitable[None]]) -> None:
        """Have ``hook(step, reason)`` awaited once fail_fast stops the mapped step named
        ``step`` (one of its instances failed); it must not raise. From then on a runner
        raises ``HeldBack(reason)`` for every body of the step's instances (``task.of``
        is ``step``'s task) it has not started."""


class Executor(Protocol):
    """Decides where sync task bodies run; pass one as ``Flow(..., executor=...)``."""

    def session(self, threads: RunThreads) -> AbstractAsyncContextManager[BodyRunner]:
        """Open the executor for one run; ``threads`` is the run's in-process thread budget.

        When fail_fast stops the run, ``threads.halt_reason`` is set and each hook
        the runner registered with ``threads.on_halt(hook)`` is awaited once,
        so that it can cancel the main-graph bodies it has not started yet; likewise
        ``threads.on_mapping_halt(hook)`` when fail_fast stops one mapped step. A runner
        that registers none lets them run, as before.
        """
        ...


@dataclass(frozen=True, slots=True)
class ThreadExecutor:
    """The default executor: sync bodies run in this process's worker threads,
    at most ``max_workers`` at once."""

    @asynccontextmanager
    async def session(self, threads: RunThreads) -> AsyncIterator[BodyRunner]:
        yield _InThreads(threads)


@dataclass(frozen=True, slots=True)
class _InThreads:
    threads: RunThreads

    async def run(
        self, task: TaskDef[..., Any], kwargs: dict[str, Any], on_abandon: Callable[[], None]
    ) -> Any:
        return await self.threads.run(functools.partial(_call_here, task, kwargs), on_abandon)


def _call_here(task: TaskDef[..., Any], kwargs: dict[str, Any]) -> Any:
    return refuse_coroutine(task.name, task.fn(**kwargs))


def is_executor(candidate: object) -> bool:
    """True when ``candidate`` looks like an ``Executor`` (it has a ``session`` method)."""
    return callable(getattr(candidate, "session", None))
