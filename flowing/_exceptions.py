"""The error tree of flowing.

    FlowingError
    ├── FlowDefinitionError (ValueError)   a task or flow was declared wrongly
    │   ├── InvalidTaskError                 a bad argument to @task
    │   ├── MissingParameterError            a task cannot receive a dependency
    │   ├── DuplicateTaskNameError           two tasks share a name in one graph
    │   ├── DetachedDependencyError          the main graph depends on a detached task
    │   ├── InvalidPoolError                 a bad pool given to Flow(pools=...)
    │   ├── UnknownPoolError                 a task names a pool its Flow does not define
    │   ├── InvalidJournalError              a journal path that cannot be a journal
    │   └── FlowCycleError                   the graph has a cycle
    ├── InvalidKeepError (TypeError)         compact_journal's keep= is not step keys
    ├── MapOverError (TypeError)             a mapped step's input cannot be mapped (recorded)
    ├── FlowAlreadyRunningError (RuntimeError)
    ├── NoRunError (RuntimeError)            asked about the last run before any run
    ├── MissingExtraError (ImportError)      an optional dependency is not installed
    ├── StepNotSucceededError (RuntimeError) asked for the value of a failed step
    ├── TaskNotRunError (KeyError)           asked for the value of a task with no result
    ├── StepKeyError (ValueError)            a task's code cannot be fingerprinted
    ├── FlowTimeoutError (TimeoutError)      the whole run missed its deadline
    ├── ExecutorBackendError (RuntimeError)  the executor cannot run on this async backend
    ├── TaskSerializationError (TypeError)   a body or value cannot travel to or from a worker
    ├── RemoteTaskLostError (RuntimeError)   the executor lost a submitted body (retryable)
    ├── ExecutorAddressError (ValueError)    an executor got a scheduler address it cannot use
    └── ExecutorUnreachableError (ConnectionError)  a run's executor cannot reach its cluster

Errors raised *by* task bodies are never wrapped in these: they are recorded on
the task's StepResult.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._results import StepState


class FlowingError(Exception):
    """Base class of every error flowing raises itself."""


class FlowDefinitionError(FlowingError, ValueError):
    """Raised before anything runs when a task or a flow is declared wrongly."""


class InvalidTaskError(FlowDefinitionError):
    """Raised when ``@task`` gets an argument it cannot use."""


class MissingParameterError(FlowDefinitionError):
    """Raised when a task's function has no parameter for one of its dependencies."""


class DuplicateTaskNameError(FlowDefinitionError):
    """Raised when two different tasks in one graph share a name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"two different tasks are named {name!r} in this flow; "
            f"give one of them another name with @task(name=...)"
        )
        self.name = name


class DetachedDependencyError(FlowDefinitionError):
    """Raised when a non-detached task depends on a detached one."""

    def __init__(self, task: str, detached: str) -> None:
        super().__init__(
            f"task {task!r} depends on detached task {detached!r}, but detached tasks "
            f"run after the main graph; make {detached!r} non-detached or "
            f"{task!r} detached"
        )
        self.task = task
        self.detached = detached


class InvalidPoolError(FlowDefinitionError):
    """Raised when ``Flow(pools=...)`` or ``Pool(...)`` gets a value it cannot use."""


class UnknownPoolError(FlowDefinitionError):
    """Raised when a task names a pool that its Flow does not define."""

    def __init__(self, task: str, pool: str, known: Sequence[str]) -> None:
        defined = ", ".join(repr(name) for name in known) or "none"
        super().__init__(
            f"task {task!r} uses pool {pool!r}, which this Flow does not define "
            f"(defined: {defined}); add Flow(pools={{{pool!r}: <size>}})"
        )
        self.task = task
        self.pool = pool


class FlowCycleError(FlowDefinitionError):
    """Raised when the graph has a cycle; ``cycle`` lists the task names on it."""

    def __init__(self, cycle: Sequence[str]) -> None:
        super().__init__(
            "the tasks form a cycle: " + " -> ".join(repr(name) for name in cycle)
        )
        self.cycle = tuple(cycle)


class MapOverError(FlowingError, TypeError):
    """Recorded on a mapped task (FAILED) when the value it maps over is not a sequence of elements."""

    def __init__(self, task: str, map_over: str, value: object, hint: str) -> None:
        shown = reprlib.repr(value)
        super().__init__(
            f"task {task!r} maps over {map_over!r}, whose value {shown} "
            f"({type(value).__name__}) cannot be mapped: {hint}"
        )
        self.task = task
        self.map_over = map_over


class FlowAlreadyRunningError(FlowingError, RuntimeError):
    """Raised when a Flow is started while the same Flow object is still running."""

    def __init__(
        self,
        message: str = "this Flow is already running; wait for it to finish or build a "
        "second Flow from the same tasks to run them concurrently",
    ) -> None:
        super().__init__(message)


class NoRunError(FlowingError, RuntimeError):
    """Raised when something about the last run is asked before the flow has run."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs a finished run of this flow; call run() first")


class MissingExtraError(FlowingError, ImportError):
    """Raised when a feature needs an optional dependency that is not installed."""

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(
            f"{feature} needs {package}, which is not installed; "
            f"install it with: pip install 'flowing[{extra}]'"
        )
        self.package = package
        self.extra = extra


class StepNotSucceededError(FlowingError, RuntimeError):
    """Raised by ``Flow.value`` for a task that ran but did not succeed."""

    def __init__(
        self, name: str, state: StepState, reason: str | None, error: BaseException | None = None
    ) -> None:
        why = reason
        if error is not None:  # the error itself is chained too, for the traceback
            from ._results import describe_error

            why = f"{reason} ({describe_error(error)})" if reason else describe_error(error)
        detail = f": {why}" if why else ""
        super().__init__(f"task {name!r} has no value: it is {state.value}{detail}")
        self.name = name
        self.state = state


class FlowTimeoutError(FlowingError, TimeoutError):
    """Raised when a whole run misses the deadline given by ``timeout_s``."""

    def __init__(self, timeout_s: float, unfinished: Sequence[str]) -> None:
        shown = ", ".join(repr(name) for name in unfinished[:5])
        more = f" and {len(unfinished) - 5} more" if len(unfinished) > 5 else ""
        super().__init__(
            f"the flow did not finish within {timeout_s} s; "
            f"cancelled {shown}{more}; call resume() to finish them"
        )
        self.timeout_s = timeout_s
        self.unfinished = tuple(unfinished)


class TaskNotRunError(FlowingError, KeyError):
    """Raised by ``Flow.value`` for a task with no result: not run yet, or not in the flow."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"task {name!r} {why}")
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class StepKeyError(FlowingError, ValueError):
    """Raised by ``compute_step_key`` when a task's code or defaults cannot be fingerprinted.

    A flow with a journal never raises it: such a task simply runs uncached.
    """

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"task {name!r} has no step key: {why}")
        self.name = name


class ExecutorBackendError(FlowingError, RuntimeError):
    """Raised when a run starts on an async backend its executor cannot use."""

    def __init__(self, executor: str, backend: str, needed: str) -> None:
        super().__init__(
            f"{executor} cannot run on the {backend} backend, it needs {needed}; "
            f"run the flow with backend={needed!r}"
        )
        self.executor = executor
        self.backend = backend


class TaskSerializationError(FlowingError, TypeError):
    """Raised (and recorded) when a task's body, inputs or value cannot be serialised."""

    def __init__(
        self, task: str, what: str, cause: BaseException, *, on_the_cluster: bool = False
    ) -> None:
        if on_the_cluster:  # pickled here, but the cluster could not rebuild it
            problem = "cannot be deserialised on the cluster"
            fix = "make sure it unpickles there (the same packages and modules as here)"
        else:
            problem = "cannot be serialised to travel between this process and the workers"
            fix = "make it picklable"
        super().__init__(
            f"task {task!r}: {what} {problem} ({type(cause).__name__}: {cause}); "
            f"{fix}, or keep the task in-process with @task(local=True)"
        )
        self.task = task


class RemoteTaskLostError(FlowingError, RuntimeError):
    """Raised (and recorded) when a submitted body's result is lost; ``retry=`` resubmits it."""

    def __init__(self, task: str, status: str) -> None:
        super().__init__(
            f"task {task!r}: its remote future ended as {status!r} without a result "
            f"(cancelled or lost outside flowing); give the task retry= to resubmit it"
        )
        self.task = task


class HeldBack(FlowingError):
    """Raised by an executor's runner for a sync body that fail_fast held back before it
    started: the task is recorded as SKIPPED with ``reason``, and never retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidJournalError(FlowDefinitionError):
    """Raised, before anything runs or is rewritten, when a journal path cannot be a
    journal: not a path, not a regular file, not writable, or another program's file."""

    def __init__(self, path: object, problem: str, fix: str) -> None:
        super().__init__(f"{path!r} cannot be used as a journal: {problem}; {fix}")
        self.path = path


class InvalidKeepError(FlowingError, TypeError):
    """Raised by ``compact_journal`` when ``keep`` is not a collection of step keys."""

    def __init__(self, keep: object, problem: str) -> None:
        super().__init__(
            f"compact_journal(keep=...) takes the step keys to keep, such as "
            f"flow.step_keys(), but got {reprlib.repr(keep)}: {problem}"
        )
        self.keep = keep


class ExecutorAddressError(FlowingError, ValueError):
    """Raised when an executor is built with a scheduler address it cannot use."""

    def __init__(self, executor: str, address: str, problem: str) -> None:
        super().__init__(
            f"{executor} cannot use the scheduler address {address!r}: {problem}; "
            f"give the address as 'tcp://host:port', such as 'tcp://10.0.0.5:8786'"
        )
        self.executor = executor
        self.address = address


class ExecutorUnreachableError(FlowingError, ConnectionError):
    """Raised when a run starts and its executor cannot reach its cluster; no task has
    started, and each is recorded CANCELLED with this error's message as the reason."""

    def __init__(self, executor: str, address: str, cause: BaseException) -> None:
        super().__init__(
            f"{executor} could not reach the scheduler at {address!r} "
            f"({type(cause).__name__}: {cause}); check that the scheduler is running "
            f"at that address and reachable from here"
        )
        self.executor = executor
        self.address = address
