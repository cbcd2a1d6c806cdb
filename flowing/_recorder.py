"""The latest run as its events tell it, kept for the timeline and the live display.

One listener on every flow's event stream keeps what a picture of the run needs:
when it started and ended, what runs now (since when, in which attempt), every
result in the order the tasks finished, and when retries happened. It keeps no
event and no object of its own per task: the results are those the flow keeps
anyway. The rich live display reads it from its own thread when it redraws,
rather than listening itself, so that showing progress adds no Python call per
event to the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from ._events import (
    Event,
    FlowFinished,
    FlowStarted,
    InstanceFinished,
    TaskFinished,
    TaskRetrying,
    TaskStarted,
    ThreadAbandoned,
)
from ._results import FAILED, StepResult


class RunRecorder:
    """An event listener that keeps the state of the latest run (see the module docstring).

    Updated on the event loop, one step at a time; a reader in another thread copies
    a dict (``dict(recorder.running)``, ``list(recorder.finished.values())``), which is
    one step under the interpreter lock.
    """

    def __init__(self) -> None:
        self.runs = 0  # FlowStarted events seen: the number of the latest run
        # Failures, retries and abandoned threads, in order, while a reader asks for
        # them (a display sets a deque and takes from its left); None: not kept.
        self.news: deque[Event] | None = None
        self._reset(None, 0)

    def _reset(self, started: float | None, pending: int) -> None:
        # Invariant: `started` is the FlowStarted time of the latest run (None before
        # any) and `pending` its count of tasks to run; `ended` its FlowFinished time
        # (None while it runs). `running` maps each task (or "step[item]" instance)
        # with a started, unfinished attempt to its first start time, in the order of
        # their first start; `attempts` maps those of them that may take more than one
        # attempt to (attempt, max attempts, next retry time or None while an attempt
        # runs). `finished` maps the index of each task finished in the run to its
        # final result, in the order they finished (replayed, skipped and cancelled
        # ones too); `retries` the index of each task that retried to the times it did.
        # `counts` is its FlowFinished's count of every result the flow holds, by state
        # value (results kept from an earlier run included), None while it runs.
        self.started = started
        self.ended: float | None = None
        self.counts: dict[str, int] | None = None
        self.pending = pending
        self.running: dict[str, float] = {}
        self.attempts: dict[str, tuple[int, int, float | None]] = {}
        self.finished: dict[int, StepResult] = {}
        self.retries: dict[int, list[float]] = {}

    def __call__(self, event: Event) -> None:
        """Take in one event. The two every task has, by their exact type, handled inline."""
        if type(event) is TaskStarted:
            if event.max_attempts == 1:
                self.running[event.task] = event.time
            else:
                self._attempt_started(event)
        elif type(event) is TaskFinished:
            result = event.result
            self.finished[event.index] = result
            self.running.pop(event.task, None)  # _forget_running, without a call per task
            if self.attempts:
                self.attempts.pop(event.task, None)
            if self.news is not None and result.state is FAILED:
                self.news.append(event)
        else:
            take = _OTHER_EVENTS.get(type(event))
            if take is not None:
                take(self, event)

    def _forget_running(self, name: str) -> None:
        self.running.pop(name, None)
        if self.attempts:
            self.attempts.pop(name, None)

    def _attempt_started(self, event: TaskStarted) -> None:
        """An attempt of a task that may take more than one: its first start stays."""
        self.running.setdefault(event.task, event.time)
        self.attempts[event.task] = (event.attempt, event.max_attempts, None)

    def _instance_finished(self, event: InstanceFinished) -> None:
        self._forget_running(event.task)  # mapped instances count with their step

    def _retrying(self, event: TaskRetrying) -> None:
        self.retries.setdefault(event.index, []).append(event.time)
        self.running.setdefault(event.task, event.time)
        retry_at = event.time + event.delay_ms / 1000
        self.attempts[event.task] = (event.attempt, event.max_attempts, retry_at)
        self._tell(event)

    def _tell(self, event: Event) -> None:
        if self.news is not None:
            self.news.append(event)

    def _flow_started(self, event: FlowStarted) -> None:
        self._reset(event.time, event.pending)
        self.runs += 1  # last: a reader that sees the new number sees the new run

    def _flow_finished(self, event: FlowFinished) -> None:
        self.counts = event.counts
        self.ended = event.time
        # A cancelled run finishes its mapped steps without an InstanceFinished for
        # their running instances: none of them runs on once the run is over.
        self.running, self.attempts = {}, {}

    def duration_ms(self) -> float:
        """How long the latest run took; 0.0 before one ended."""
        if self.started is None or self.ended is None:
            return 0.0
        return (self.ended - self.started) * 1000


_OTHER_EVENTS: dict[type, Callable[[RunRecorder, Any], None]] = {
    InstanceFinished: RunRecorder._instance_finished,
    TaskRetrying: RunRecorder._retrying,
    ThreadAbandoned: RunRecorder._tell,
    FlowStarted: RunRecorder._flow_started,
    FlowFinished: RunRecorder._flow_finished,
}
