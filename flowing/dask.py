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
from ._mapping import TaskInstance
from ._runners import running_asyncio_loop
from ._task import TaskDef

try:
    import cloudpickle  # type: ignore[import-untyped]
    import distributed
except ImportError as error:  # pragma: no cover - depends on the environment
    raise MissingExtraError("flowing.dask", "distributed", "dask") from error

__all__ = ["DaskExecutor"]

# Errors that pickle/cloudpickle raise for an object they cannot serialise.
_SERIALISATION_ERRORS = (TypeError, AttributeError, pickle.PicklingError)
# What connecting to an unreachable scheduler raises (asyncio's TimeoutError is no
# OSError before Python 3.11).
_CONNECT_ERRORS = (OSError, asyncio.TimeoutError)
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

    A body and its inputs travel as bytes pickled here, rebuilt by a wrapper on the
    worker just before the call (``_call_on_worker``): the scheduler never unpickles
    them, and what a worker cannot unpickle fails that task with
    ``TaskSerializationError``. (Left to Dask, a worker that cannot unpickle a task
    loses its connection to the scheduler, and the task is retried on other workers
    until ``distributed.scheduler.allowed-failures``, or the run's timeout, ends it.)

    When fail_fast halts the run, or stops one mapped step, the bodies it stops that
    have not started stay so: each main-graph body is submitted with its stop tokens
    (the run's; an instance's also its mapped step's), the wrapper returns a marker
    instead of calling the body once one of them is in its worker's halted tokens,
    and ``_halt`` cancels the futures that no worker had started. Invariants:
    ``_in_flight`` holds the guarded futures submitted and not yet awaited to the
    end, by key, with their tokens; ``_held_back`` the keys ``_halt`` cancelled;
    ``_halted`` the halted tokens with why, ``_told`` those the workers were told of.
    """

    def __init__(self, client: distributed.Client, threads: RunThreads) -> None:
        self.client = client
        self.threads = threads
        self._run_id = uuid.uuid4().hex
        self._not_started = f"flowing: not started, run {self._run_id} halted"
        self._not_rebuilt = f"flowing: not unpickled, run {self._run_id}"
        self._remote = _call_on_worker(self._not_started, self._not_rebuilt)
        self._in_flight: dict[str, tuple[distributed.Future[Any], tuple[str, ...]]] = {}
        self._held_back: set[str] = set()
        self._halted: dict[str, str] = {}
        self._told: list[str] = []
        threads.on_halt(self._hold_back)
        threads.on_mapping_halt(self._hold_back_mapping)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, client: distributed.Client, threads: RunThreads
    ) -> AsyncIterator[_DaskRunner]:
        """A runner for one run; afterwards the workers forget its halted tokens."""
        runner = cls(client, threads)
        try:
            yield runner
        finally:
            if runner._told:
                with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
                    await client.run(_forget(runner._told), on_error="ignore")

    async def run(
        self, task: TaskDef[..., Any], kwargs: dict[str, Any], on_abandon: Callable[[], None]
    ) -> Any:
        tokens = self._tokens(task)
        reason = self._stop_reason(tokens)
        if reason is not None:
            raise HeldBack(reason)
        key = f"{task.name}-{uuid.uuid4().hex}"
        future = self._submit(key, task, kwargs, tokens)
        if tokens:
            self._in_flight[key] = (future, tokens)
        try:
            value = await _outcome(task.name, future)
        except RemoteTaskLostError:
            if key not in self._held_back:
                raise
            value = self._not_started  # cancelled by _halt before it started
        except BaseException:
            if future.status == "pending":  # a timeout or a cancelled run: cancel it remotely
                with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
                    await self.client.cancel(future)  # type: ignore[no-untyped-call]
            raise
        finally:
            self._in_flight.pop(key, None)
        if type(value) is str and value == self._not_started:
            raise HeldBack(self._stop_reason(tokens) or "fail_fast stopped the run")
        unpickling = self._unpickling_error(value)
        if unpickling is not None:
            what = "its function or its inputs"
            refused = TaskSerializationError(task.name, what, unpickling, on_the_cluster=True)
            raise refused from unpickling
        return value

    def _submit(
        self, key: str, task: TaskDef[..., Any], kwargs: dict[str, Any], tokens: tuple[str, ...]
    ) -> distributed.Future[Any]:
        """Submit the body with its inputs, pickled here, as Dask key ``key``.

        Each PickleBuffer travels as a frame of its own, not copied into Dask's pickle:
        the pickled body, and the buffers of inputs that hand theirs out (NumPy arrays),
        which are not copied into the body's pickle either.
        """
        buffers: list[pickle.PickleBuffer] = []
        try:  # a partial keeps the body's own keyword names clear of submit()'s options
            body = functools.partial(task.fn, **kwargs)
            payload = cloudpickle.dumps(body, protocol=5, buffer_callback=buffers.append)
        except _SERIALISATION_ERRORS as error:
            raise TaskSerializationError(task.name, "its function or its inputs", error) from error
        sent = pickle.PickleBuffer(payload)
        return self.client.submit(self._remote, sent, buffers, tokens, key=key, pure=False)

    def _unpickling_error(self, value: Any) -> BaseException | None:
        """What the worker raised unpickling the body, when ``value`` is its report of it."""
        if type(value) is tuple and len(value) == 2 and type(value[0]) is str:
            if value[0] == self._not_rebuilt and isinstance(value[1], BaseException):
                return value[1]
        return None

    def _tokens(self, task: TaskDef[..., Any]) -> tuple[str, ...]:
        """What stops a body of ``task`` by fail_fast: the run, and an instance's mapped
        step; nothing for a detached task."""
        if task.detached:
            return ()
        if isinstance(task, TaskInstance):
            return (self._run_id, f"{self._run_id}/{task.of.name}")
        return (self._run_id,)

    def _stop_reason(self, tokens: tuple[str, ...]) -> str | None:
        """Why a body with ``tokens`` must not start now; None: it may."""
        if tokens and self.threads.halt_reason is not None:
            return self.threads.halt_reason
        return next((self._halted[t] for t in tokens if t in self._halted), None)

    async def _hold_back(self, reason: str) -> None:
        """fail_fast halted the run: hold back every main-graph body not started."""
        await self._halt(self._run_id, reason)

    async def _hold_back_mapping(self, step: str, reason: str) -> None:
        """fail_fast stopped mapped step ``step``: hold back its instances not started."""
        await self._halt(f"{self._run_id}/{step}", reason)

    async def _halt(self, token: str, reason: str) -> None:
        """Cancel every guarded future stopped by ``token`` whose body has not started.

        The workers are asked once; each, in one step of its event loop, marks
        ``token`` halted (the wrappers return the marker from then on) and names which
        of the keys it is executing or has finished. No other key can start its body
        after that, so cancelling the others loses nothing a body produced.
        """
        self._halted[token] = reason
        pending = {key: f for key, (f, tokens) in self._in_flight.items() if token in tokens}
        if not pending:
            return
        self._told.append(token)
        # Without an answer what started is unknown: nothing is cancelled, and the
        # bodies the wrappers hold back end with the marker once a worker is free.
        with anyio.move_on_after(_CANCEL_GRACE_S):
            try:
                answers = await self.client.run(_halt_on_worker(token, list(pending)))
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
# their closure, the standard library and ``distributed``.


def _call_on_worker(
    not_started: str, not_rebuilt: str
) -> Callable[[pickle.PickleBuffer, list[pickle.PickleBuffer], tuple[str, ...]], Any]:
    """A body's wrapper on the workers: ``not_started`` once one of its stop tokens is
    halted; ``(not_rebuilt, error)`` when the body cannot be unpickled there."""

    def call(
        payload: pickle.PickleBuffer, buffers: list[pickle.PickleBuffer], tokens: tuple[str, ...]
    ) -> Any:
        import pickle

        if tokens:
            from distributed import get_worker  # a global would cost 0.2 ms more to pickle

            halted = getattr(get_worker(), "flowing_halted", ())
            if any(token in halted for token in tokens):
                return not_started
        try:
            # Dask hands the buffers over read-only; a body may write to its inputs.
            writable = [bytearray(b) if memoryview(b).readonly else b for b in buffers]
            body = pickle.loads(payload, buffers=writable)
        except Exception as error:
            try:  # the error travels back to the client as the task's value
                pickle.loads(pickle.dumps(error))
            except Exception:
                error = RuntimeError(f"{type(error).__name__}: {error}")
            return (not_rebuilt, error)
        return body()

    return call


def _halt_on_worker(token: str, keys: list[str]) -> Callable[[Any], list[str]]:
    """For ``client.run``: mark ``token`` halted; which of ``keys`` this worker started."""

    def halt(dask_worker: Any) -> list[str]:
        vars(dask_worker).setdefault("flowing_halted", set()).add(token)
        state = dask_worker.state
        running = {ts.key for ts in state.all_running_tasks}  # executing or seceded
        done = [k for k in keys if k in state.tasks and state.tasks[k].state in ("memory", "error")]
        return [key for key in keys if key in running] + done

    return halt


def _forget(tokens: list[str]) -> Callable[[Any], None]:
    """For ``client.run``: drop ``tokens`` from the worker's halted tokens."""

    def forget(dask_worker: Any) -> None:
        vars(dask_worker).get("flowing_halted", set()).difference_update(tokens)

    return forget


async def _outcome(name: str, future: distributed.Future[Any]) -> Any:
    """The body's value; its own exception as raised; a clear error for anything lost.

    The scheduler never unpickles a body or its inputs (they travel as bytes), so
    Dask's error for a task graph it cannot unpickle, a plain RuntimeError that
    distributed gives no type of its own, cannot stand for them.
    """
    await future.exception()  # type: ignore[no-untyped-call]  # waits for the end
    if future.status == "error":
        return await future.result()  # raises the body's own exception
    if future.status != "finished":
        raise RemoteTaskLostError(name, str(future.status))
    try:
        return await future.result()
    except _SERIALISATION_ERRORS as error:
        raise TaskSerializationError(name, "its return value", error) from error


def send_by_value(module_names: set[str]) -> None:
    """Pickle the functions of these modules by value, for workers that cannot import them."""
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
