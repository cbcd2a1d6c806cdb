"""Run sync task bodies on a Dask cluster: ``Flow(..., executor=DaskExecutor(address))``.

Needs the ``dask`` extra (``pip install 'flowing[dask]'``); ``import flowing``
never imports this module. flowing keeps owning the graph, gates, retries,
timeouts, fail_fast and events; Dask only runs the bodies.

Each run opens an asynchronous ``distributed.Client`` on the run's own asyncio
event loop, so futures are awaited without blocking the loop and without extra
threads. distributed's asynchronous client needs asyncio: on the trio backend a
run fails at once with ``ExecutorBackendError``.
"""

from __future__ import annotations

import asyncio
import functools
import pickle
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from ._exceptions import (
    ExecutorAddressError,
    ExecutorBackendError,
    ExecutorUnreachableError,
    HeldBack,
    MissingExtraError,
    RemoteTaskLostError,
    TaskSerializationError,
)
from ._executor import BodyRunner, RunThreads
from ._runners import running_asyncio_loop
from ._task import TaskDef

try:
    import distributed
except ImportError as error:  # pragma: no cover - depends on the environment
    raise MissingExtraError("flowing.dask", "distributed", "dask") from error

__all__ = ["DaskExecutor"]

# Errors that pickle/cloudpickle raise for an object they cannot serialise.
_SERIALISATION_ERRORS = (TypeError, AttributeError, pickle.PicklingError)
# What connecting to an unreachable scheduler raises (asyncio's TimeoutError is no
# OSError before Python 3.11).
_CONNECT_ERRORS = (OSError, asyncio.TimeoutError)
# How the scheduler fails every key of a graph it could not unpickle (a RuntimeError
# chained from the unpickling error): misleading when an input failed to rebuild.
_GRAPH_NOT_DESERIALISED = "Error during deserialization of the task graph"
_CANCEL_GRACE_S = 5.0


class DaskExecutor:
    """Run sync task bodies on the Dask cluster behind a scheduler address or a Client.

    ``client_or_address`` is a scheduler address (``"tcp://10.0.0.5:8786"``, checked
    here; the cluster is reached when a run starts), a
    ``distributed.Client`` or a cluster object with a ``scheduler_address``
    (such as ``distributed.LocalCluster``). Async bodies and tasks declared
    ``@task(local=True)`` stay in this process.
    """

    def __init__(self, client_or_address: distributed.Client | str | Any) -> None:
        self._client: distributed.Client | None = None
        self._security: Any = None
        if isinstance(client_or_address, distributed.Client):
            self._client = client_or_address
            self._security = client_or_address.security
            address = getattr(client_or_address.scheduler, "address", None)
        elif isinstance(client_or_address, str):
            address = client_or_address
        else:
            address = getattr(client_or_address, "scheduler_address", None)
            self._security = getattr(client_or_address, "security", None)
        if not isinstance(address, str) or not address:
            raise TypeError(
                f"DaskExecutor needs a scheduler address, a distributed.Client or a "
                f"cluster with a scheduler_address, got {client_or_address!r}"
            )
        if isinstance(client_or_address, str):
            _check_address(address)
        self.address = address

    def __repr__(self) -> str:
        return f"DaskExecutor({self.address!r})"

    @asynccontextmanager
    async def session(self, threads: RunThreads) -> AsyncIterator[BodyRunner]:
        """Connect to the cluster on this run's event loop; close the connection after it."""
        loop = running_asyncio_loop()
        if loop is None:
            raise ExecutorBackendError("DaskExecutor", "trio", "asyncio")
        if self._client is not None and self._client.asynchronous and _loop_of(self._client) is loop:
            async with _DaskRunner.open(self._client, threads) as runner:
                yield runner
            return
        client = distributed.Client(  # type: ignore[no-untyped-call]  # connects when awaited
            self.address, asynchronous=True, security=self._security, set_as_default=False
        )
        try:
            try:
                await client
            except _CONNECT_ERRORS as error:
                raise ExecutorUnreachableError("DaskExecutor", self.address, error) from error
            async with _DaskRunner.open(client, threads) as runner:
                yield runner
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()  # type: ignore[no-untyped-call]


class _DaskRunner:
    """Submits each sync body as one Dask future and awaits it on the event loop.

    When fail_fast halts the run, the main-graph bodies that have not started stay
    so: each is submitted wrapped in a guard that returns a marker instead of calling
    the body once the run's id is in its worker's halted runs, and ``_hold_back``
    cancels those that no worker had started. Invariants: ``_in_flight`` holds the
    guarded futures submitted and not yet awaited to the end, by key; ``_held_back``
    the keys ``_hold_back`` cancelled.
    """

    def __init__(self, client: distributed.Client, threads: RunThreads) -> None:
        self.client = client
        self.threads = threads
        self._run_id = uuid.uuid4().hex
        self._not_started = f"flowing: not started, run {self._run_id} halted"
        self._guarded = _guard(self._run_id, self._not_started)
        self._in_flight: dict[str, distributed.Future[Any]] = {}
        self._held_back: set[str] = set()
        self._workers_told = False
        threads.on_halt(self._hold_back)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, client: distributed.Client, threads: RunThreads
    ) -> AsyncIterator[_DaskRunner]:
        """A runner for one run; afterwards the workers forget the run if it was halted."""
        runner = cls(client, threads)
        try:
            yield runner
        finally:
            if runner._workers_told:  # forget the halted run on the workers
                with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
                    await client.run(_forget(runner._run_id), on_error="ignore")

    async def run(
        self, task: TaskDef[..., Any], kwargs: dict[str, Any], on_abandon: Callable[[], None]
    ) -> Any:
        guarded = not task.detached  # fail_fast never holds back detached tasks
        if guarded and self.threads.halt_reason is not None:
            raise HeldBack(self.threads.halt_reason)
        # A partial keeps the body's own keyword names clear of submit()'s options,
        # and needs no flowing on the workers.
        call = functools.partial(task.fn, **kwargs)
        if guarded:
            call = functools.partial(self._guarded, call)
        key = f"{task.name}-{uuid.uuid4().hex}"
        try:
            future = self.client.submit(call, key=key, pure=False)
        except _SERIALISATION_ERRORS as error:
            raise TaskSerializationError(task.name, "its function or its inputs", error) from error
        if guarded:
            self._in_flight[key] = future
        try:
            value = await _outcome(task.name, future)
        except RemoteTaskLostError:
            if key not in self._held_back:
                raise
            value = self._not_started  # cancelled by _hold_back before it started
        except BaseException:
            if future.status == "pending":  # a timeout or a cancelled run: cancel it remotely
                with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
                    await self.client.cancel(future)  # type: ignore[no-untyped-call]
            raise
        finally:
            self._in_flight.pop(key, None)
        if guarded and type(value) is str and value == self._not_started:
            raise HeldBack(self.threads.halt_reason or "fail_fast stopped the run")
        return value

    async def _hold_back(self, reason: str) -> None:
        """fail_fast halted the run: cancel every guarded future whose body has not started.

        The workers are asked once; each, in one step of its event loop, marks the
        run halted (its guards return the marker from then on) and names which of
        the keys it is executing or has finished. No other key can start its body
        after that, so cancelling the others loses nothing a body produced.
        """
        pending = dict(self._in_flight)
        if not pending:
            return
        self._workers_told = True
        # Without an answer what started is unknown: nothing is cancelled, and the
        # bodies the guards hold back end with the marker once a worker is free.
        with anyio.move_on_after(_CANCEL_GRACE_S):
            try:
                answers = await self.client.run(_halt_on_worker(self._run_id, list(pending)))
                started = set().union(*answers.values())
                unstarted = {key: f for key, f in pending.items() if key not in started}
                self._held_back.update(unstarted)
                if unstarted:
                    futures = list(unstarted.values())
                    await self.client.cancel(futures, reason=reason)  # type: ignore[no-untyped-call]
            except Exception:
                pass


# The functions below run on the workers. cloudpickle sends a nested function by value,
# so the workers need no flowing; a module-level flowing function would be sent by
# reference and fail to unpickle where flowing is not installed. They use nothing but
# their closure and ``distributed``.


def _guard(run_id: str, not_started: str) -> Callable[[Callable[[], Any]], Any]:
    """A body's wrapper on the workers: once ``run_id`` is halted, ``not_started`` instead."""

    def guarded(call: Callable[[], Any]) -> Any:
        from distributed import get_worker  # a global would cost 0.2 ms more to pickle

        if run_id in getattr(get_worker(), "flowing_halted_runs", ()):
            return not_started
        return call()

    return guarded


def _halt_on_worker(run_id: str, keys: list[str]) -> Callable[[Any], list[str]]:
    """For ``client.run``: mark ``run_id`` halted; which of ``keys`` this worker started."""

    def halt(dask_worker: Any) -> list[str]:
        vars(dask_worker).setdefault("flowing_halted_runs", set()).add(run_id)
        state = dask_worker.state
        running = {ts.key for ts in state.all_running_tasks}  # executing or seceded
        done = [k for k in keys if k in state.tasks and state.tasks[k].state in ("memory", "error")]
        return [key for key in keys if key in running] + done

    return halt


def _forget(run_id: str) -> Callable[[Any], None]:
    """For ``client.run``: drop ``run_id`` from the worker's halted runs."""

    def forget(dask_worker: Any) -> None:
        vars(dask_worker).get("flowing_halted_runs", set()).discard(run_id)

    return forget


async def _outcome(name: str, future: distributed.Future[Any]) -> Any:
    """The body's value; its own exception as raised; a clear error for anything lost."""
    error = await future.exception()  # type: ignore[no-untyped-call]  # waits
    if future.status == "error":
        if isinstance(error, RuntimeError) and str(error).startswith(_GRAPH_NOT_DESERIALISED):
            cause = error.__cause__ or error
            what = "its function or its inputs"
            raise TaskSerializationError(name, what, cause, on_the_cluster=True) from error
        return await future.result()  # raises the body's own exception
    if future.status != "finished":
        raise RemoteTaskLostError(name, str(future.status))
    try:
        return await future.result()
    except _SERIALISATION_ERRORS as error:
        raise TaskSerializationError(name, "its return value", error) from error


def send_by_value(module_names: set[str]) -> None:
    """Pickle the functions of these modules by value, for workers that cannot import them."""
    import cloudpickle  # type: ignore[import-untyped]

    for name in module_names:
        module = sys.modules.get(name)
        if module is not None and not name.startswith("flowing"):
            cloudpickle.register_pickle_by_value(module)


def _check_address(address: str) -> None:
    """Raise ExecutorAddressError unless Dask can parse ``address``; nothing is resolved."""
    from distributed.comm.addressing import get_address_host

    try:
        get_address_host(address)
    except ValueError as error:
        raise ExecutorAddressError("DaskExecutor", address, str(error)) from error


def _loop_of(client: distributed.Client) -> object:
    return getattr(client.loop, "asyncio_loop", None)
