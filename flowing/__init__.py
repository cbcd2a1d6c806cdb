"""flowing: run a DAG of plain Python functions on an anyio core.

Layout, in the order a task travels: ``_task`` (the @task definition) ->
``_graph`` (collection and validation) -> ``_scheduler`` (the async core) ->
``_attempt`` (one task's gates, retries and timeouts) with ``_executor`` (where
a sync body runs: ``_threads`` by default, or the optional ``flowing.dask``) ->
``_results`` and ``_events`` (what a run leaves and tells) -> ``_flow`` (the
Flow facade). Alongside: ``_keys`` (content-addressed step keys), ``_journal``
and ``_serializers`` (the durable journal). This module only re-exports.

``import flowing`` loads only what declaring tasks and building a Flow needs, so
that it stays fast (issue 5: under 60 ms). The names in ``_LAZY`` are imported on
first access by ``__getattr__`` (PEP 562); ``Flow`` imports the engine when it runs.
"""

import typing as _typing

from ._exceptions import DetachedDependencyError as DetachedDependencyError
from ._exceptions import DuplicateTaskNameError as DuplicateTaskNameError
from ._exceptions import ExecutorAddressError as ExecutorAddressError
from ._exceptions import ExecutorBackendError as ExecutorBackendError
from ._exceptions import ExecutorUnreachableError as ExecutorUnreachableError
from ._exceptions import FlowAlreadyRunningError as FlowAlreadyRunningError
from ._exceptions import FlowCycleError as FlowCycleError
from ._exceptions import FlowDefinitionError as FlowDefinitionError
from ._exceptions import FlowingError as FlowingError
from ._exceptions import FlowTimeoutError as FlowTimeoutError
from ._exceptions import HeldBack as HeldBack
from ._exceptions import InvalidJournalError as InvalidJournalError
from ._exceptions import InvalidKeepError as InvalidKeepError
from ._exceptions import InvalidPoolError as InvalidPoolError
from ._exceptions import InvalidTaskError as InvalidTaskError
from ._exceptions import MapOverError as MapOverError
from ._exceptions import MissingExtraError as MissingExtraError
from ._exceptions import MissingParameterError as MissingParameterError
from ._exceptions import NoRunError as NoRunError
from ._exceptions import RemoteTaskLostError as RemoteTaskLostError
from ._exceptions import StepKeyError as StepKeyError
from ._exceptions import StepNotSucceededError as StepNotSucceededError
from ._exceptions import TaskNotRunError as TaskNotRunError
from ._exceptions import TaskSerializationError as TaskSerializationError
from ._exceptions import UnknownPoolError as UnknownPoolError
from ._flow import Flow as Flow
from ._pools import Pool as Pool
from ._results import StepResult as StepResult
from ._results import StepState as StepState
from ._task import TaskDef as TaskDef
from ._task import clear_registry as clear_registry
from ._task import task as task

if _typing.TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from ._events import Event as Event
    from ._events import FlowFinished as FlowFinished
    from ._events import FlowStarted as FlowStarted
    from ._events import InstanceFinished as InstanceFinished
    from ._events import TaskFinished as TaskFinished
    from ._events import TaskRetrying as TaskRetrying
    from ._events import TaskStarted as TaskStarted
    from ._events import ThreadAbandoned as ThreadAbandoned
    from ._executor import BodyRunner as BodyRunner
    from ._executor import RunThreads as RunThreads
    from ._executor import Executor as Executor
    from ._executor import ThreadExecutor as ThreadExecutor
    from ._journal import compact_journal as compact_journal
    from ._keys import compute_step_key as compute_step_key
    from ._serializers import JsonSerializer as JsonSerializer
    from ._serializers import PickleSerializer as PickleSerializer
    from ._serializers import Serializer as Serializer
    from ._stream import EventStream as EventStream

_LAZY = {
    "Event": "._events",
    "FlowFinished": "._events",
    "FlowStarted": "._events",
    "InstanceFinished": "._events",
    "TaskFinished": "._events",
    "TaskRetrying": "._events",
    "TaskStarted": "._events",
    "ThreadAbandoned": "._events",
    "BodyRunner": "._executor",
    "RunThreads": "._executor",
    "Executor": "._executor",
    "ThreadExecutor": "._executor",
    "compact_journal": "._journal",
    "compute_step_key": "._keys",
    "JsonSerializer": "._serializers",
    "PickleSerializer": "._serializers",
    "Serializer": "._serializers",
    "EventStream": "._stream",
}
"""Public names imported on first use: name -> the module that defines it."""


if not _typing.TYPE_CHECKING:  # hidden from type checkers, which then flag unknown names

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(module, __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "BodyRunner",
    "DetachedDependencyError",
    "DuplicateTaskNameError",
    "Event",
    "EventStream",
    "Executor",
    "ExecutorAddressError",
    "ExecutorBackendError",
    "ExecutorUnreachableError",
    "Flow",
    "FlowAlreadyRunningError",
    "FlowCycleError",
    "FlowDefinitionError",
    "FlowFinished",
    "FlowStarted",
    "FlowTimeoutError",
    "FlowingError",
    "HeldBack",
    "InstanceFinished",
    "InvalidJournalError",
    "InvalidKeepError",
    "InvalidPoolError",
    "InvalidTaskError",
    "JsonSerializer",
    "MapOverError",
    "MissingExtraError",
    "MissingParameterError",
    "NoRunError",
    "PickleSerializer",
    "Pool",
    "RemoteTaskLostError",
    "RunThreads",
    "Serializer",
    "StepKeyError",
    "StepNotSucceededError",
    "StepResult",
    "StepState",
    "TaskDef",
    "TaskFinished",
    "TaskNotRunError",
    "TaskRetrying",
    "TaskSerializationError",
    "TaskStarted",
    "UnknownPoolError",
    "ThreadAbandoned",
    "ThreadExecutor",
    "__version__",
    "clear_registry",
    "compact_journal",
    "compute_step_key",
    "task",
]
