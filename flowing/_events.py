"""The event stream: one immutable event per transition of a run.

Every observer of a run (logging, callbacks, progress, timelines) reads this one
stream. ``time`` is a ``time.monotonic()`` reading; ``index`` is the task's
position in the flow's topological order and ``total`` the number of tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Union

from ._log import logger
from ._frozen import quick_constructor
from ._results import StepResult, describe_error, describe_outcome


@dataclass(frozen=True, slots=True)
class FlowStarted:
    """A run began; ``pending`` tasks will be run, ``total`` are in the graph."""

    total: int
    pending: int
    time: float


@dataclass(frozen=True, slots=True)
class FlowFinished:
    """A run ended (normally, failed, cancelled or timed out); ``counts`` by state value."""

    total: int
    counts: dict[str, int] = field(hash=False)
    time: float
    duration_ms: float


@dataclass(frozen=True, slots=True)
class _TaskEvent:
    task: str
    index: int
    total: int
    time: float


@dataclass(frozen=True, slots=True)
class TaskStarted(_TaskEvent):
    """Attempt ``attempt`` of at most ``max_attempts`` began."""

    attempt: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class TaskRetrying(_TaskEvent):
    """Attempt ``attempt`` failed; the next one starts after ``delay_ms``."""

    attempt: int
    max_attempts: int
    error: BaseException | None
    delay_ms: float


@dataclass(frozen=True, slots=True)
class ThreadAbandoned(_TaskEvent):
    """A sync body was cancelled or timed out; its thread runs on, unwatched."""

    attempt: int


@dataclass(frozen=True, slots=True)
class TaskFinished(_TaskEvent):
    """The task reached a final state; ``result`` holds it."""

    result: StepResult


@dataclass(frozen=True, slots=True)
class InstanceFinished(_TaskEvent):
    """Instance ``item`` of a mapped task (``task`` is ``"name[item]"``) reached a final state."""

    item: int
    result: StepResult


# For the engine, which builds two or three events per task.
make_started = quick_constructor(TaskStarted)
make_finished = quick_constructor(TaskFinished)
make_instance_finished = quick_constructor(InstanceFinished)

Event = Union[
    FlowStarted,
    FlowFinished,
    TaskStarted,
    TaskRetrying,
    ThreadAbandoned,
    TaskFinished,
    InstanceFinished,
]


def retry_cause(event: TaskRetrying) -> str:
    """Why the attempt that ``event`` retries did not stand: its error, or the retry_until= gate."""
    return describe_error(event.error) if event.error else "retry_until= said no"


def log_event(event: Event) -> None:
    """One log line per transition on the ``flowing`` logger."""
    if isinstance(event, TaskFinished):
        result = event.result
        level = logging.WARNING if result.error is not None else logging.INFO
        if logger.isEnabledFor(level):
            detail = describe_outcome(result)
            logger.log(
                level,
                "task %r %s in %.1f ms after %d attempt(s)%s",
                event.task,
                result.state.value,
                result.duration_ms,
                result.attempts,
                f": {detail}" if detail else "",
            )
    elif isinstance(event, TaskStarted):
        if logger.isEnabledFor(logging.DEBUG):  # one of two events per task: keep it cheap
            logger.debug(
                "task %r started, attempt %d of %d", event.task, event.attempt, event.max_attempts
            )
    elif isinstance(event, TaskRetrying):
        logger.info(
            "task %r attempt %d of %d failed (%s); retrying in %.0f ms",
            event.task,
            event.attempt,
            event.max_attempts,
            retry_cause(event),
            event.delay_ms,
        )
    elif isinstance(event, ThreadAbandoned):
        logger.warning(
            "task %r: its sync body was abandoned after a timeout or cancellation; the "
            "thread keeps running and holds its worker slot until the function returns",
            event.task,
        )
    elif isinstance(event, InstanceFinished):
        result = event.result
        level = logging.WARNING if result.error is not None else logging.DEBUG
        if logger.isEnabledFor(level):
            detail = describe_outcome(result)
            logger.log(
                level,
                "instance %r %s after %d attempt(s)%s",
                event.task,
                result.state.value,
                result.attempts,
                f": {detail}" if detail else "",
            )
    elif isinstance(event, FlowStarted):
        logger.info("flow started: %d of %d tasks to run", event.pending, event.total)
    else:
        logger.info("flow finished in %.1f ms: %s", event.duration_ms, event.counts)
