"""OpenTelemetry spans: one per run under the caller's span, one per attempt under the run."""

from __future__ import annotations

import sys

import pytest

from _flows import flaky_broken_report

from flowing import MissingExtraError

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode  # noqa: E402

from flowing._otel import SpanRecorder  # noqa: E402


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_each_attempt_is_a_span_under_the_run_under_the_callers_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    flow = flaky_broken_report(SpanRecorder(provider))
    with provider.get_tracer("app").start_as_current_span("request") as request:
        flow.run()
    finished = {(s.name, s.attributes.get("flowing.attempt")): s for s in exporter.get_finished_spans()}
    run = finished[("flowing.run", None)]
    assert run.parent is not None and run.parent.span_id == request.get_span_context().span_id
    attempts = {key: s for key, s in finished.items() if key[0].startswith("flowing.task")}
    assert sorted(attempts) == [
        ("flowing.task broken", 1),
        ("flowing.task flaky", 1),
        ("flowing.task flaky", 2),
    ]
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in attempts.values())
    statuses = {key: s.status.status_code for key, s in attempts.items()}
    assert statuses == {
        ("flowing.task flaky", 1): StatusCode.ERROR,
        ("flowing.task flaky", 2): StatusCode.UNSET,
        ("flowing.task broken", 1): StatusCode.ERROR,
    }
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes["flowing.tasks.skipped"] == 1
    assert [e.attributes["flowing.task"] for e in run.events] == ["report"]


@pytest.mark.anyio
async def test_arun_nests_under_the_span_current_in_the_calling_task(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    flow = flaky_broken_report(SpanRecorder(provider))
    with provider.get_tracer("app").start_as_current_span("handler") as handler:
        await flow.arun()
    run = next(s for s in exporter.get_finished_spans() if s.name == "flowing.run")
    assert run.parent is not None and run.parent.span_id == handler.get_span_context().span_id


def test_without_an_sdk_tracing_is_a_no_op() -> None:
    results = flaky_broken_report(tracing=True).run()
    assert [r.state.value for r in results.values()] == ["succeeded", "failed", "skipped"]


def test_tracing_without_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'flowing\[otel\]'"):
        flaky_broken_report(tracing=True)
