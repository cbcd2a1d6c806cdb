"""OpenTelemetry spans built from the event stream: one per run, one per task attempt.

Uses ``opentelemetry-api`` only (``pip install 'flowing[otel]'``), imported when a
Flow is created with ``tracing=True``; without a configured SDK every span is a
no-op. The run's span is a child of the span current when ``run()``/``arun()``
was called, and each attempt's span a child of the run's span.
"""

from __future__ import annotations

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
    retry_cause,
)
from ._exceptions import MissingExtraError
from ._results import StepResult, StepState, describe_outcome


class SpanRecorder:
    """An event listener that turns a run's events into spans."""

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace import Status, StatusCode
        except ImportError:
            raise MissingExtraError("Flow(tracing=True)", "opentelemetry-api", "otel") from None
        from . import __version__

        self._trace = trace
        self._status, self._error_code = Status, StatusCode.ERROR
        self._tracer = trace.get_tracer("flowing", __version__, tracer_provider=tracer_provider)
        # Invariant: `_run` is the span of the run in progress (None between runs);
        # `_attempts` holds the open span of each attempt that has started and not ended.
        self._run: Any = None
        self._run_context: Any = None
        self._attempts: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, TaskStarted):
            self._attempts[event.task] = self._tracer.start_span(
                f"flowing.task {event.task}",
                context=self._run_context,
                attributes={
                    "flowing.task": event.task,
                    "flowing.attempt": event.attempt,
                    "flowing.max_attempts": event.max_attempts,
                },
            )
        elif isinstance(event, (TaskFinished, InstanceFinished)):
            self._finish(event.task, event.result)
        elif isinstance(event, TaskRetrying):
            span = self._attempts.pop(event.task, None)
            if span is not None:
                if event.error is not None:
                    span.record_exception(event.error)
                why = retry_cause(event)
                span.set_status(self._error(why))
                span.set_attribute("flowing.retry_delay_ms", event.delay_ms)
                span.end()
        elif isinstance(event, ThreadAbandoned):
            span = self._attempts.get(event.task)
            if span is not None:
                span.add_event("sync thread abandoned")
        elif isinstance(event, FlowStarted):
            self._start_run(event)
        elif isinstance(event, FlowFinished):
            self._end_run(event)

    def _error(self, description: str) -> Any:
        return self._status(self._error_code, description)

    def _start_run(self, event: FlowStarted) -> None:
        self._attempts = {}
        self._run = self._tracer.start_span(
            "flowing.run",
            attributes={"flowing.tasks.total": event.total, "flowing.tasks.pending": event.pending},
        )
        self._run_context = self._trace.set_span_in_context(self._run)

    def _finish(self, task: str, result: StepResult) -> None:
        span = self._attempts.pop(task, None)
        if span is None:
            if self._run is not None:  # never attempted: skipped, cached or cancelled early
                self._run.add_event(
                    f"task {result.state.value}",
                    {"flowing.task": task, "flowing.reason": result.reason or ""},
                )
            return
        span.set_attribute("flowing.state", result.state.value)
        if result.state is not StepState.SUCCEEDED:
            if result.error is not None:
                span.record_exception(result.error)
            span.set_status(self._error(f"{result.state.value}: {describe_outcome(result)}"))
        span.end()

    def _end_run(self, event: FlowFinished) -> None:
        for span in self._attempts.values():
            span.set_status(self._error("the run ended while it was running"))
            span.end()
        self._attempts = {}
        if self._run is None:
            return
        for state, count in event.counts.items():
            self._run.set_attribute(f"flowing.tasks.{state}", count)
        if event.counts.get("failed") or event.counts.get("cancelled"):
            self._run.set_status(self._error(f"{event.counts.get('failed', 0)} task(s) failed"))
        self._run.end()
        self._run = self._run_context = None
