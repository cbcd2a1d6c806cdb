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
    ExecutorBackendError,
    MissingExtraError,
    RemoteTaskLostError,
    TaskSerializationError,
)
from ._executor import BodyRunner
from ._task import TaskDef
from ._threads import ThreadSlots

try:
    import distributed
except ImportError as error:  # pragma: no cover - depends on the environment
    raise MissingExtraError("flowing.dask", "distributed", "dask") from error

__all__ = ["DaskExecutor"]

# Errors that pickle/cloudpickle raise for an object they cannot serialise.
_SERIALISATION_ERRORS = (TypeError, AttributeError, pickle.PicklingError)
_CANCEL_GRACE_S = 5.0


class DaskExecutor:
    """Run sync task bodies on the Dask cluster behind a scheduler address or a Client.

    ``client_or_address`` is a scheduler address (``"tcp://10.0.0.5:8786"``), a
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
        self.address = address

    def __repr__(self) -> str:
        return f"DaskExecutor({self.address!r})"

    @asynccontextmanager
    async def session(self, threads: ThreadSlots) -> AsyncIterator[BodyRunner]:
        """Connect to the cluster on this run's event loop; close the connection after it."""
        loop = _running_asyncio_loop()
        if loop is None:
            raise ExecutorBackendError("DaskExecutor", "trio", "asyncio")
        if self._client is not None and self._client.asynchronous and _loop_of(self._client) is loop:
            yield _DaskRunner(self._client)
            return
        client = await distributed.Client(  # type: ignore[no-untyped-call]
            self.address, asynchronous=True, security=self._security, set_as_default=False
        )
        try:
            yield _DaskRunner(client)
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()


class _DaskRunner:
    """Submits each sync body as one Dask future and awaits it on the event loop."""

    def __init__(self, client: distributed.Client) -> None:
        self.client = client

    async def run(
        self, task: TaskDef[..., Any], kwargs: dict[str, Any], on_abandon: Callable[[], None]
    ) -> Any:
        # A partial keeps the body's own keyword names clear of submit()'s options,
        # and needs no flowing on the workers.
        call = functools.partial(task.fn, **kwargs)
        try:
            future = self.client.submit(call, key=f"{task.name}-{uuid.uuid4().hex}", pure=False)
        except _SERIALISATION_ERRORS as error:
            raise TaskSerializationError(task.name, "its function or its inputs", error) from error
        try:
            return await _outcome(task.name, future)
        except BaseException:
            if future.status == "pending":  # a timeout or a cancelled run: cancel it remotely
                with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
                    await self.client.cancel(future)  # type: ignore[no-untyped-call]
            raise


async def _outcome(name: str, future: distributed.Future[Any]) -> Any:
    """The body's value; its own exception as raised; a clear error for anything lost."""
    await future.exception()  # type: ignore[no-untyped-call]  # waits, fetches nothing
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
    import cloudpickle  # type: ignore[import-untyped]

    for name in module_names:
        module = sys.modules.get(name)
        if module is not None and not name.startswith("flowing"):
            cloudpickle.register_pickle_by_value(module)


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _loop_of(client: distributed.Client) -> object:
    return getattr(client.loop, "asyncio_loop", None)
