"""The run recorder keeps the latest run as its events tell it, for the timeline and the display."""

from __future__ import annotations

from collections import deque

import anyio
import pytest

from _flows import flaky_broken_report

from flowing import Event, Flow, FlowTimeoutError, StepState, TaskStarted, ThreadAbandoned, task
from flowing._recorder import RunRecorder


def recorded_run(flow: Flow, recorder: RunRecorder | None = None) -> RunRecorder:
    """``recorder`` (a new one by default) fed every event of one run of ``flow``."""
    recorder = recorder or RunRecorder()
    seen: list[Event] = []
    flow._events.add(seen.append, "test")
    flow.run()
    for event in seen:
        recorder(event)
    return recorder


def test_it_keeps_every_result_in_the_order_the_tasks_finished() -> None:
    recorder = recorded_run(flaky_broken_report())
    assert [(r.name, r.state) for r in recorder.finished.values()] == [
        ("flaky", StepState.SUCCEEDED),
        ("broken", StepState.FAILED),
        ("report", StepState.SKIPPED),
    ]
    assert (recorder.runs, recorder.pending) == (1, 3)
    assert recorder.started is not None and recorder.ended is not None
    assert recorder.duration_ms() == pytest.approx((recorder.ended - recorder.started) * 1000)


def test_it_knows_what_runs_and_forgets_a_task_with_retries_once_it_finished() -> None:
    seen: list[Event] = []
    flaky_broken_report(seen.append).run()
    recorder = RunRecorder()
    for event in seen[:3]:  # flaky's first attempt failed, its retry not started
        recorder(event)
    assert list(recorder.running) == ["flaky"]
    attempt, max_attempts, retry_at = recorder.attempts["flaky"]
    assert (attempt, max_attempts) == (1, 2) and retry_at is not None
    recorder(seen[3])  # the second attempt
    assert recorder.attempts["flaky"] == (2, 2, None)
    assert recorder.running["flaky"] == seen[1].time  # since its first start
    for event in seen[4:]:
        recorder(event)
    assert recorder.running == {} and recorder.attempts == {}
    assert list(recorder.retries) == [0] and len(recorder.retries[0]) == 1


def test_it_shows_nothing_running_once_a_run_cancelled_inside_a_mapped_task_finished() -> None:
    @task
    def items() -> list[int]:
        return [1, 2, 3]

    @task(depends_on=[items], map_over="items", retry=1)
    async def wait(items: int) -> None:
        await anyio.sleep(10)

    recorder = RunRecorder()
    with pytest.raises(FlowTimeoutError):
        Flow(wait, on_event=recorder).run(timeout_s=0.2)
    assert recorder.finished[1].state is StepState.CANCELLED
    assert recorder.running == {} and recorder.attempts == {}


def test_it_keeps_failures_retries_and_abandoned_threads_as_news_only_when_asked() -> None:
    assert recorded_run(flaky_broken_report()).news is None
    recorder = RunRecorder()
    recorder.news = deque()
    recorded_run(flaky_broken_report(), recorder)
    recorder(ThreadAbandoned("stuck", 0, 1, 1.0, 1))
    assert [(type(e).__name__, getattr(e, "task", None)) for e in recorder.news] == [
        ("TaskRetrying", "flaky"),
        ("TaskFinished", "broken"),
        ("ThreadAbandoned", "stuck"),
    ]


def test_a_new_run_starts_a_new_record() -> None:
    flow = flaky_broken_report()
    flow.run()
    first = flow._recorder.finished
    flow.run()
    assert flow._recorder.runs == 2
    assert flow._recorder.finished is not first and len(flow._recorder.finished) == 3


def test_a_started_event_of_a_task_that_may_not_retry_marks_it_running_from_then() -> None:
    recorder = RunRecorder()
    recorder(TaskStarted("a", 0, 1, 5.0, 1, 1))
    assert (recorder.running, recorder.attempts) == ({"a": 5.0}, {})
