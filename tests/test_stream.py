"""The event stream reaches on_event callbacks and events() iterators, in order, safely."""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest

from flowing import (
    Event,
    EventStream,
    Flow,
    FlowDefinitionError,
    FlowFinished,
    FlowStarted,
    FlowTimeoutError,
    StepState,
    TaskFinished,
    TaskRetrying,
    TaskStarted,
    task,
)
from flowing._stream import Broadcaster


def describe(event: Event) -> tuple[Any, ...]:
    """An event as a comparable tuple without timestamps."""
    if isinstance(event, FlowStarted):
        return ("flow started", event.pending, event.total)
    if isinstance(event, FlowFinished):
        return ("flow finished", event.counts["succeeded"], event.counts["failed"], event.counts["skipped"])
    if isinstance(event, TaskStarted):
        return ("started", event.task, event.attempt, event.max_attempts)
    if isinstance(event, TaskRetrying):
        return ("retrying", event.task, event.attempt, event.delay_ms)
    if isinstance(event, TaskFinished):
        return ("finished", event.task, event.result.state.value, event.result.reason)
    return (type(event).__name__, event.task)


def build_chain(on_event: Any = None, **options: Any) -> Flow:
    @task
    def extract() -> int:
        return 1

    @task(depends_on=[extract])
    def load(extract: int) -> int:
        return extract + 1

    return Flow(load, on_event=on_event, **options)


CHAIN = [
    ("flow started", 2, 2),
    ("started", "extract", 1, 1),
    ("finished", "extract", "succeeded", None),
    ("started", "load", 1, 1),
    ("finished", "load", "succeeded", None),
    ("flow finished", 2, 0, 0),
]


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self) -> str:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("try again")
        return "ok"


@pytest.mark.anyio
async def test_a_sync_callback_sees_every_transition_in_order() -> None:
    seen: list[Event] = []
    flow = build_chain(seen.append)
    await flow.arun()
    assert [describe(e) for e in seen] == CHAIN


@pytest.mark.anyio
async def test_on_event_given_to_flow_receives_the_events() -> None:
    @task
    def only() -> int:
        return 1

    seen: list[Event] = []
    await Flow(only, on_event=seen.append).arun()
    assert [describe(e) for e in seen] == [
        ("flow started", 1, 1),
        ("started", "only", 1, 1),
        ("finished", "only", "succeeded", None),
        ("flow finished", 1, 0, 0),
    ]


@pytest.mark.anyio
async def test_an_async_callback_has_seen_every_event_when_arun_returns() -> None:
    seen: list[Event] = []

    async def record(event: Event) -> None:
        await anyio.sleep(0)
        seen.append(event)

    flow = build_chain(record)
    await flow.arun()
    assert [describe(e) for e in seen] == CHAIN


def test_events_tell_retries_skips_and_failures() -> None:
    flaky = task(Flaky(1), name="flaky", retry=1, retry_backoff_base_ms=0)

    @task
    def broken() -> None:
        raise ValueError("bad row")

    @task(depends_on=[broken])
    def after(broken: None) -> None: ...

    @task(when=lambda: False)
    def gated() -> None: ...

    seen: list[Event] = []
    Flow(flaky, after, gated, fail_fast=False, on_event=seen.append).run()
    by_task: dict[str, list[tuple[Any, ...]]] = {}
    for event in seen[1:-1]:
        by_task.setdefault(event.task, []).append(describe(event))  # type: ignore[union-attr]
    assert by_task == {
        "flaky": [
            ("started", "flaky", 1, 2),
            ("retrying", "flaky", 1, 0.0),
            ("started", "flaky", 2, 2),
            ("finished", "flaky", "succeeded", None),
        ],
        "broken": [("started", "broken", 1, 1), ("finished", "broken", "failed", None)],
        "after": [("finished", "after", "skipped", "dependency 'broken' failed")],
        "gated": [("finished", "gated", "skipped", "when= returned a falsy value")],
    }
    assert describe(seen[-1]) == ("flow finished", 1, 1, 2)


def test_every_task_event_carries_its_index_and_the_total() -> None:
    seen: list[Event] = []
    flow = build_chain(seen.append)
    flow.run()
    task_events = [e for e in seen if isinstance(e, (TaskStarted, TaskFinished))]
    assert {(e.task, e.index, e.total) for e in task_events} == {("extract", 0, 2), ("load", 1, 2)}
    assert [e.time for e in seen] == sorted(e.time for e in seen)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_raising_callback_is_logged_once_and_the_run_goes_on(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Event] = []

    def explode(event: Event) -> None:
        calls.append(event)
        raise RuntimeError("observer bug")

    async def explode_async(event: Event) -> None:
        explode(event)

    flow = build_chain(explode_async if is_async else explode)
    with caplog.at_level(logging.ERROR, logger="flowing"):
        results = flow.run()
    assert all(r.state is StepState.SUCCEEDED for r in results.values())
    assert len(calls) == len(CHAIN)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "observer bug" in str(errors[0].exc_info[1])  # type: ignore[index]


def test_a_sync_callable_returning_a_coroutine_is_reported_not_awaited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(event: Event) -> None: ...

    flow = build_chain(lambda event: handler(event))
    with caplog.at_level(logging.ERROR, logger="flowing"):
        flow.run()
    assert "declare it async def" in caplog.text


@pytest.mark.anyio
async def test_events_iterates_one_run_in_order_and_ends_with_it() -> None:
    flow = build_chain()
    stream = flow.events()
    seen: list[Event] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.arun)
        async for event in stream:
            seen.append(event)
    assert [describe(e) for e in seen] == CHAIN
    assert stream.dropped == 0


@pytest.mark.anyio
async def test_a_full_buffer_discards_the_oldest_events_and_keeps_the_last() -> None:
    flow = build_chain()
    stream = flow.events(buffer=2)
    await flow.arun()  # nobody reads while the run goes on
    assert [describe(e) async for e in stream] == CHAIN[-2:]
    assert stream.dropped == len(CHAIN) - 2


@pytest.mark.anyio
async def test_a_stream_subscribed_after_a_run_waits_for_the_next_one() -> None:
    flow = build_chain()
    await flow.arun()
    stream = flow.events()
    await flow.arun()
    assert [describe(e) async for e in stream] == CHAIN


@pytest.mark.anyio
async def test_a_closed_stream_stops_and_the_run_is_unaffected() -> None:
    flow = build_chain()
    stream = flow.events()
    await stream.aclose()
    results = await flow.arun()
    assert [e async for e in stream] == []
    assert len(results) == 2


@pytest.mark.anyio
async def test_an_async_callback_still_gets_flow_finished_after_a_timeout() -> None:
    @task
    async def slow() -> None:
        await anyio.sleep(60)

    seen: list[Event] = []

    async def record(event: Event) -> None:
        seen.append(event)

    flow = Flow(slow, on_event=record)
    with pytest.raises(FlowTimeoutError):
        await flow.arun(timeout_s=0.05)
    assert describe(seen[-1]) == ("flow finished", 0, 0, 0)
    assert seen[-2].result.state is StepState.CANCELLED  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_a_bad_buffer_size_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="buffer must be an int >= 1"):
        EventStream(bad)


def test_a_buffer_beyond_any_size_is_no_bound() -> None:
    assert EventStream(10**30).buffer == sys.maxsize


def test_a_non_callable_on_event_is_refused() -> None:
    @task
    def only() -> None: ...

    with pytest.raises(FlowDefinitionError, match="on_event must be a callable"):
        Flow(only, on_event="print")  # type: ignore[arg-type]


async def _async_no_argument() -> None: ...


@pytest.mark.parametrize(
    ("on_event", "problem"),
    [
        (lambda: None, "too many positional arguments"),
        (lambda event, extra: None, "missing a required argument: 'extra'"),
        (_async_no_argument, "too many positional arguments"),
    ],
    ids=["no-argument", "two-arguments", "async-no-argument"],
)
def test_an_on_event_that_cannot_take_an_event_is_refused_when_the_flow_is_built(
    on_event: Any, problem: str
) -> None:
    @task
    def only() -> None: ...

    with pytest.raises(FlowDefinitionError) as caught:
        Flow(only, on_event=on_event)
    assert str(caught.value) == (
        f"on_event must take the event as its one argument, but {problem}: "
        f"{on_event!r} would fail on every event"
    )


def _injecting(fn: Any) -> Any:
    """A decorator that supplies the first argument: its signature is the wrapped one's."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn([], *args, **kwargs)

    return wrapper


@_injecting
def _handler_given_a_sink(sink: list[Any], event: Event) -> None:
    sink.append(event)


class _Recorder:
    def __call__(self, event: Event) -> None: ...


@pytest.mark.parametrize(
    "on_event",
    [
        _handler_given_a_sink,
        functools.partial(lambda prefix, event: None, "flow"),
        print,
        _Recorder(),
        [].append,
    ],
    ids=["decorated-with-wraps", "partial", "builtin", "object-with-call", "bound-method"],
)
def test_an_on_event_that_can_take_an_event_is_accepted(on_event: Any) -> None:
    @task
    def only() -> None: ...

    assert Flow(only, on_event=on_event).run()["only"].state is StepState.SUCCEEDED


def test_an_abandoned_sync_body_is_reported_between_its_start_and_its_failure() -> None:
    release = threading.Event()

    @task(timeout_s=0.05)
    def stuck() -> None:
        release.wait(30)

    seen: list[Event] = []
    try:
        Flow(stuck, on_event=seen.append).run()
    finally:
        release.set()
    assert [describe(e)[0] for e in seen] == [
        "flow started",
        "started",
        "ThreadAbandoned",
        "finished",
        "flow finished",
    ]
    assert seen[-2].result.state is StepState.FAILED  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_run_cancelled_while_its_journal_opens_still_ends_its_event_stream(
    tmp_path: Any,
) -> None:
    flow = build_chain(journal_path=tmp_path / "journal")
    stream = flow.events()
    with anyio.CancelScope() as scope:
        scope.cancel()  # the journal is opened first: the cancellation lands there
        await flow.arun()
    with anyio.fail_after(5):  # before the fix, the stream waited for a run that never came
        seen = [describe(e) async for e in stream]
    assert seen == [
        ("flow started", 2, 2),
        *[("finished", name, "cancelled", "the run was cancelled before it started") for name in ("extract", "load")],
        ("flow finished", 0, 0, 0),
    ]
    assert {r.state for r in flow.results.values()} == {StepState.CANCELLED}


@pytest.mark.anyio
async def test_an_async_callback_that_never_catches_up_is_cancelled_at_the_runs_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stuck(event: Event) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(10):  # a generous bound: without the deadline it would hang
        results = await build_chain(stuck).arun(timeout_s=0.2)
    assert [r.state for r in results.values()] == [StepState.SUCCEEDED] * 2
    assert "was cancelled: it had not caught up with the run by its timeout_s=0.2" in caplog.text


@pytest.mark.anyio
async def test_an_async_callback_that_fell_behind_is_told_how_many_events_it_missed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()
    seen: list[Event] = []

    async def slow(event: Event) -> None:
        await release.wait()
        seen.append(event)

    events = Broadcaster(slow, buffer=2)
    async with events.delivering():
        for event in [FlowStarted(3, 3, 0.0)] * 4 + [FlowFinished(3, {}, 0.0, 0.0)]:
            events.emit(event)
        release.set()
    assert [type(e) for e in seen] == [FlowStarted, FlowFinished]  # the last two
    assert "fell behind: 3 event(s) of the run were dropped (at most 2 wait for it" in caplog.text


@pytest.mark.anyio
async def test_events_can_be_iterated_in_another_threads_event_loop(anyio_backend: str) -> None:
    flow = build_chain()
    stream = flow.events()
    seen: list[Event] = []

    async def consume() -> None:
        async for event in stream:
            seen.append(event)

    consumer = threading.Thread(target=anyio.run, args=(consume,), kwargs={"backend": anyio_backend})
    consumer.start()
    results = await flow.arun()
    await anyio.to_thread.run_sync(consumer.join, 10)
    assert not consumer.is_alive()
    assert len(results) == 2 and [describe(e) for e in seen] == CHAIN


@pytest.mark.anyio
async def test_a_consumer_may_go_on_iterating_in_a_later_event_loop(anyio_backend: str) -> None:
    go = threading.Event()

    @task
    def held() -> int:
        assert go.wait(10)  # the first event was taken in the consumer's first loop
        return 1

    flow = Flow(held)
    stream = flow.events()
    seen: list[str] = []

    async def first() -> None:
        seen.append(type(await stream.__anext__()).__name__)

    async def rest() -> None:
        with anyio.fail_after(10):
            seen.extend([type(e).__name__ async for e in stream])

    def consume() -> None:
        anyio.run(first, backend=anyio_backend)
        go.set()
        anyio.run(rest, backend=anyio_backend)

    consumer = threading.Thread(target=consume)
    consumer.start()
    await flow.arun()
    await anyio.to_thread.run_sync(consumer.join, 20)
    assert seen == ["FlowStarted", "TaskStarted", "TaskFinished", "FlowFinished"]
