"""Plain sync instances of a mapped task run in batches on the run's worker threads."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import anyio
import pytest

from flowing import (
    Event,
    Flow,
    FlowFinished,
    FlowTimeoutError,
    InstanceFinished,
    StepState,
    TaskFinished,
    TaskStarted,
    ThreadAbandoned,
    task,
)

from _tracker import Tracker

from flowing import _batches

WAIT_S = 10  # a generous bound: only reached when something is broken
pytestmark = pytest.mark.anyio


def _source(value: Any, name: str = "items") -> Any:
    return task(name=name)(lambda: value)


async def test_instances_run_on_at_most_max_workers_threads_and_keep_element_order() -> None:
    tracker = Tracker(limit=2)
    items = _source(list(range(6)))

    @task(depends_on=[items], map_over="items")
    def square(items: int) -> int:
        tracker.enter()
        try:
            if items < 2:  # the first two hold on until both run at once
                assert tracker.full.wait(WAIT_S)
            return items * items
        finally:
            tracker.leave()

    results = await Flow(square, max_workers=2).arun()
    assert results["square"].value == [0, 1, 4, 9, 16, 25]
    assert tracker.peak == 2


async def test_each_instance_starts_then_finishes_before_its_step_finishes() -> None:
    items = _source([1, 2, 3])

    @task(depends_on=[items], map_over="items")
    def double(items: int) -> int:
        return 2 * items

    events: list[Event] = []
    await Flow(double, on_event=events.append).arun()
    mine = [(type(e).__name__, e.task) for e in events if getattr(e, "task", "").startswith("double")]
    for k in range(3):
        assert mine.index(("TaskStarted", f"double[{k}]")) < mine.index(("InstanceFinished", f"double[{k}]"))
    assert (mine[0], mine[-1]) == (("TaskStarted", "double"), ("TaskFinished", "double"))
    assert len(mine) == 2 + 3 * 2
    started = {e.task: e for e in events if isinstance(e, TaskStarted)}
    ends = {e.task: e for e in events if isinstance(e, InstanceFinished)}
    finished = {name: e.result for name, e in ends.items()}
    for k in range(3):
        result = finished[f"double[{k}]"]
        assert (result.state, result.value, result.attempts) == (StepState.SUCCEEDED, 2 * (k + 1), 1)
        assert result.started_at <= result.finished_at <= ends[f"double[{k}]"].time
        assert started[f"double[{k}]"].time <= ends[f"double[{k}]"].time


async def test_a_body_that_raises_cancelled_error_fails_its_instance_only() -> None:
    items = _source([0, 1])

    @task(depends_on=[items], map_over="items")
    def odd(items: int) -> int:
        if items == 1:
            raise asyncio.CancelledError("nobody asked")
        return items

    results = await Flow(odd, fail_fast=False).arun()
    assert results["odd"].state is StepState.FAILED
    assert isinstance(results["odd"].error, asyncio.CancelledError)
    assert results["odd"].reason == (
        "1 of 2 instance(s) failed, first 'odd[1]': raised a cancellation nothing had asked for"
    )


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboardinterrupt_in_an_instance_stops_the_run_then_propagates(
    exc_type: type[BaseException], anyio_backend: str
) -> None:
    items = _source([0, 1, 2])
    calls: list[int] = []

    @task(depends_on=[items], map_over="items")
    def use(items: int) -> int:
        calls.append(items)
        if items == 1:
            raise exc_type
        return items

    flow = Flow(use, max_workers=1)
    with pytest.raises(exc_type):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
    assert calls == [0, 1]
    assert flow.results["use"].state is StepState.FAILED
    assert isinstance(flow.results["use"].error, exc_type)


def test_an_instance_running_when_the_run_times_out_is_reported_abandoned(anyio_backend: str) -> None:
    items = _source([0, 1])
    release = threading.Event()
    running = threading.Event()

    @task(depends_on=[items], map_over="items")
    def wait(items: int) -> int:
        running.set()
        assert release.wait(WAIT_S)
        return items

    events: list[Event] = []
    flow = Flow(wait, max_workers=1, on_event=events.append)
    try:
        with pytest.raises(FlowTimeoutError):
            flow.run(timeout_s=0.2, backend=anyio_backend)  # type: ignore[arg-type]
    finally:
        release.set()
    assert running.is_set()
    abandoned = [e.task for e in events if isinstance(e, ThreadAbandoned)]
    assert abandoned == ["wait[0]"]
    assert isinstance(events[-1], FlowFinished)
    assert flow.results["wait"].state is StepState.CANCELLED
    assert not any(isinstance(e, InstanceFinished) for e in events)


async def test_other_sync_tasks_get_the_thread_in_turn_while_many_instances_wait() -> None:
    """The only thread is not kept for the whole mapping: a batch gives it up after
    its turn, and the tasks waiting meanwhile all run in theirs."""
    items = _source(list(range(100)))
    mapping_started = threading.Event()
    order: list[str] = []

    @task(depends_on=[items], map_over="items")
    def slow(items: int) -> None:
        mapping_started.set()
        order.append(f"slow[{items}]")
        time.sleep(0.003)

    @task(depends_on=[items])
    async def later(items: list[int]) -> None:
        with anyio.fail_after(WAIT_S):
            while not mapping_started.is_set():
                await anyio.sleep(0.001)

    def make_other(n: int) -> Any:
        @task(depends_on=[later], name=f"other{n}")
        def other(later: None) -> None:
            order.append(f"other{n}")

        return other

    others = [make_other(n) for n in range(40)]
    await Flow(slow, *others, max_workers=1).arun()
    assert max(order.index(f"other{n}") for n in range(40)) < order.index("slow[99]")


async def test_two_mappings_at_once_each_keep_their_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    original = _batches.InstanceBatches._run_batch

    def counting(self: Any) -> None:
        nonlocal calls
        calls += 1
        original(self)

    monkeypatch.setattr(_batches.InstanceBatches, "_run_batch", counting)
    items = _source(list(range(2000)))

    @task(depends_on=[items], map_over="items")
    def first(items: int) -> int:
        return items

    @task(depends_on=[items], map_over="items")
    def second(items: int) -> int:
        return -items

    results = await Flow(first, second, max_workers=2).arun()
    assert results["second"].value == [-k for k in range(2000)]
    assert calls < 400  # one call per instance when each gave way to the other at once


async def test_a_mapping_stopped_by_another_tasks_failure_names_it() -> None:
    items = _source(list(range(50)))
    mapping_started = threading.Event()

    @task(depends_on=[items], map_over="items")
    def each(items: int) -> int:
        mapping_started.set()
        time.sleep(0.002)
        return items

    @task(depends_on=[items])
    async def boom(items: list[int]) -> None:
        with anyio.fail_after(WAIT_S):
            while not mapping_started.is_set():
                await anyio.sleep(0.001)
        raise ValueError("boom")

    results = await Flow(each, boom, max_workers=1).arun()
    assert results["each"].state is StepState.SKIPPED
    assert "not started: fail_fast stopped the run after 'boom' failed" in (results["each"].reason or "")


async def test_an_instance_returning_a_coroutine_fails_under_its_own_name() -> None:
    items = _source([1])

    async def later() -> None: ...

    @task(depends_on=[items], map_over="items")
    def lazy(items: int) -> Any:
        return later()

    results = await Flow(lazy).arun()
    assert results["lazy"].state is StepState.FAILED
    assert str(results["lazy"].error).startswith("task 'lazy[0]' returned an un-awaited coroutine")


async def test_bodies_see_the_context_of_the_run() -> None:
    request = contextvars.ContextVar("request", default="none")
    items = _source([0, 1])

    @task(depends_on=[items], map_over="items")
    def read(items: int) -> str:
        return request.get()

    request.set("r-42")
    results = await Flow(read).arun()
    assert results["read"].value == ["r-42", "r-42"]


@pytest.mark.parametrize(
    "options",
    [{"retry": 1}, {"timeout_s": 5.0}, {"max_concurrency": 2}, {"when": lambda items: True}],
    ids=["retry", "timeout", "max_concurrency", "gate"],
)
async def test_instances_with_a_policy_still_run_one_by_one_with_the_same_results(
    options: dict[str, Any],
) -> None:
    items = _source([1, 2, 3])

    @task(depends_on=[items], map_over="items", **options)
    def triple(items: int) -> int:
        return 3 * items

    events: list[Event] = []
    results = await Flow(triple, on_event=events.append).arun()
    assert results["triple"].value == [3, 6, 9]
    assert [e.task for e in events if isinstance(e, TaskFinished)][-1] == "triple"


async def test_a_batch_runs_many_instances_with_few_trips_through_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the batches are for: 2,000 instances, far fewer deliveries than instances."""
    deliveries = 0
    original = _batches.InstanceBatches._deliver

    def counting(self: Any, reports: list[Any]) -> None:
        nonlocal deliveries
        deliveries += 1
        original(self, reports)

    monkeypatch.setattr(_batches.InstanceBatches, "_deliver", counting)
    items = _source(list(range(2000)))

    @task(depends_on=[items], map_over="items")
    def same(items: int) -> int:
        return items

    results = await Flow(same).arun()
    assert results["same"].value == list(range(2000))
    assert 0 < deliveries < 1000


async def test_an_instance_abandoned_by_a_cancelled_run_was_reported_started_before() -> None:
    """The run is cancelled just as the thread starts the next instance: its
    TaskStarted, pending on the way to the loop, must precede its ThreadAbandoned."""
    items = _source([0, 1])
    cancelled = threading.Event()
    second_runs = threading.Event()
    release = threading.Event()

    @task(depends_on=[items], map_over="items")
    def hold(items: int) -> int:
        if items == 0:
            assert cancelled.wait(WAIT_S)
        else:
            second_runs.set()
            assert release.wait(WAIT_S)
        return items

    events: list[Event] = []
    with anyio.CancelScope() as outer:

        def on_event(event: Event) -> None:
            events.append(event)
            if isinstance(event, TaskStarted) and event.task == "hold[0]":
                outer.cancel()  # the run is cancelled now, while the loop is busy here ...
                cancelled.set()
                assert second_runs.wait(WAIT_S)  # ... and the thread has started hold[1]

        try:
            await Flow(hold, max_workers=1, on_event=on_event).arun()
        finally:
            release.set()
    mine = [type(e).__name__ for e in events if getattr(e, "task", "") == "hold[1]"]
    assert mine == ["TaskStarted", "ThreadAbandoned"]


async def test_event_times_never_go_back() -> None:
    """Each event is stamped when the loop emits it, as for lanes: a display's clock
    (``progress=True``) never runs backwards."""
    items = _source(list(range(200)))

    @task(depends_on=[items], map_over="items")
    def same(items: int) -> int:
        return items

    events: list[Event] = []
    await Flow(same, max_workers=2, on_event=events.append).arun()
    times = [e.time for e in events]
    assert times == sorted(times)


async def test_an_instance_whose_start_comes_after_the_run_was_cancelled_never_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The thread took the next instance, then the run was cancelled and ended
    before the start reached the loop: that body must not run unseen."""
    items = _source([0, 1])
    token = anyio.lowlevel.current_token()
    flow_over, batch_over = threading.Event(), threading.Event()
    ran: list[int] = []

    class CancelledBeforeTheSecondStart(_batches.LoopInbox):  # type: ignore[type-arg]
        def put(self, item: Any) -> bool:
            if item == _batches.InstanceStarted(1):
                anyio.from_thread.run_sync(outer.cancel, token=token)
                assert flow_over.wait(WAIT_S)
            return super().put(item)

    real_run_batch = _batches.InstanceBatches._run_batch

    def run_batch(self: _batches.InstanceBatches) -> None:
        try:
            real_run_batch(self)
        finally:
            batch_over.set()

    monkeypatch.setattr(_batches, "LoopInbox", CancelledBeforeTheSecondStart)
    monkeypatch.setattr(_batches.InstanceBatches, "_run_batch", run_batch)

    @task(depends_on=[items], map_over="items")
    def record(items: int) -> int:
        ran.append(items)
        return items

    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, FlowFinished):
            flow_over.set()

    with anyio.CancelScope() as outer:
        await Flow(record, max_workers=1, on_event=on_event).arun()
    assert batch_over.wait(WAIT_S)
    assert ran == [0]
    assert not [e for e in events if getattr(e, "task", "") == "record[1]"]
