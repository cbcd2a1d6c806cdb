"""Thread lanes: plain sync tasks go straight to worker threads, a sync chain stays on its thread.

Lanes exist on asyncio only; the tests that do not name a backend state what
every run guarantees, lanes or not, and run on both.
"""

from __future__ import annotations

import contextvars
import gc
import threading
import time
import weakref
from typing import Any

import anyio
import anyio.to_thread
import pytest

from flowing import Event, Flow, StepState, TaskDef, TaskFinished, TaskStarted, ThreadAbandoned, task

pytestmark = pytest.mark.anyio

on_asyncio = pytest.mark.parametrize("anyio_backend", ["asyncio"])
marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")


def _chain(length: int, body: Any) -> list[TaskDef[..., Any]]:
    made: list[TaskDef[..., Any]] = [task(body, name="link0")]
    for k in range(1, length):
        made.append(task(body, name=f"link{k}", depends_on=[made[-1]]))
    return made


@on_asyncio
async def test_a_sync_chain_runs_on_one_worker_thread() -> None:
    threads: list[int] = []

    def link(**previous: int) -> int:
        threads.append(threading.get_ident())
        return 1 + sum(previous.values())

    chain = _chain(50, link)
    results = await Flow(chain[-1], max_workers=4).arun()
    assert results["link49"].value == 50
    assert len(threads) == 50 and len(set(threads)) == 1
    assert threads[0] != threading.get_ident()


async def test_each_chain_link_starts_after_its_dependency_finished() -> None:
    seen: list[Event] = []
    chain = _chain(20, lambda **previous: len(previous))
    results = await Flow(chain[-1], on_event=seen.append).arun()
    order = [(type(e).__name__, e.task) for e in seen if isinstance(e, (TaskStarted, TaskFinished))]
    for k in range(1, 20):
        assert order.index(("TaskFinished", f"link{k - 1}")) < order.index(("TaskStarted", f"link{k}"))
        before, after = results[f"link{k - 1}"], results[f"link{k}"]
        assert before.finished_at is not None and after.started_at is not None
        assert before.finished_at <= after.started_at
    assert [e.time for e in seen] == sorted(e.time for e in seen)
    assert all(results[t.name].attempts == 1 for t in chain)


async def test_sync_bodies_never_exceed_max_workers_and_use_all_of_them() -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    all_three_in = threading.Barrier(3, timeout=10)

    def body() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        all_three_in.wait()  # passes only while three bodies run at once
        with lock:
            running -= 1

    fan = [task(body, name=f"plain{k}") for k in range(12)]
    retried = [task(body, name=f"retried{k}", retry=1) for k in range(6)]  # not lane tasks
    results = await Flow(*fan, *retried, max_workers=3).arun()
    assert all(r.succeeded for r in results.values()), results
    assert most == 3


async def test_fail_fast_holds_back_queued_sync_tasks_without_a_start_event() -> None:
    seen: list[Event] = []
    bad_started = threading.Event()
    others_queued = threading.Event()

    @task
    def bad() -> None:
        bad_started.set()
        others_queued.wait(10)
        raise ValueError("boom")

    @task
    async def gate() -> None:  # the others become ready only while bad holds the one worker
        await anyio.to_thread.run_sync(bad_started.wait, 10)

    @task(depends_on=[gate])
    async def release_bad(gate: None) -> None:  # runs once its siblings are claimed
        others_queued.set()

    others = [task(lambda gate: None, name=f"other{k}", depends_on=[gate]) for k in range(8)]
    flow = Flow(bad, release_bad, *others, max_workers=1, on_event=seen.append)
    results = await flow.arun()

    started = {e.task for e in seen if isinstance(e, TaskStarted)}
    assert results["bad"].state is StepState.FAILED
    for other in others:
        assert other.name not in started
        result = results[other.name]
        assert result.state is StepState.SKIPPED
        assert result.reason == "not started: fail_fast stopped the run after 'bad' failed"
        assert result.started_at is None


async def test_a_chain_stops_at_a_failed_link_and_skips_the_rest() -> None:
    def link(**previous: int) -> int:
        if previous.get("link2") is not None:
            raise RuntimeError("link3 breaks")
        return 1 + sum(previous.values())

    chain = _chain(6, link)
    results = await Flow(chain[-1], fail_fast=False).arun()
    assert [results[f"link{k}"].state for k in range(6)] == [StepState.SUCCEEDED] * 3 + [
        StepState.FAILED
    ] + [StepState.SKIPPED] * 2
    assert results["link4"].reason == "dependency 'link3' failed"


async def test_a_cancelled_run_keeps_what_finished_and_abandons_the_running_body() -> None:
    seen: list[Event] = []
    one_started = threading.Event()
    release = threading.Event()

    def blocking(done_first: int) -> None:
        one_started.set()
        release.wait(10)

    @task
    def done_first() -> int:
        return 1

    blockers = [task(blocking, name=f"blocker{k}", depends_on=[done_first]) for k in range(2)]
    flow = Flow(*blockers, max_workers=1, on_event=seen.append)
    async with anyio.create_task_group() as tg:

        async def cancel_once_one_runs() -> None:
            await anyio.to_thread.run_sync(one_started.wait, 10)
            tg.cancel_scope.cancel()

        tg.start_soon(cancel_once_one_runs)
        await flow.arun()
    release.set()

    results = flow.results
    assert results["done_first"].value == 1
    assert {results[b.name].state for b in blockers} == {StepState.CANCELLED}
    by_reason = {results[b.name].reason: b.name for b in blockers}
    assert set(by_reason) == {
        "the run was cancelled while it was running",
        "the run was cancelled before it started",
    }
    abandoned = [e.task for e in seen if isinstance(e, ThreadAbandoned)]
    assert abandoned == [by_reason["the run was cancelled while it was running"]]


@on_asyncio
async def test_a_body_the_loop_has_not_heard_of_yet_is_abandoned_as_running_when_the_run_is_cancelled() -> None:
    seen: list[Event] = []
    gate_runs, go = threading.Event(), threading.Event()
    last_started, release = threading.Event(), threading.Event()

    def gate() -> int:
        gate_runs.set()
        go.wait(10)
        return 1

    def last(gate: int) -> None:  # runs next on gate's thread: a chain
        last_started.set()
        release.wait(10)

    gate_task = task(gate)
    last_task = task(last, depends_on=[gate_task])

    @task
    async def watcher() -> None:
        await anyio.to_thread.run_sync(gate_runs.wait, 10)
        outer.cancel()  # the lanes' keeper will drop their reports before it hears of `last`
        go.set()
        last_started.wait(10)  # blocks the loop: `last` starts before the cancellation lands
        await anyio.sleep_forever()

    flow = Flow(last_task, watcher, max_workers=2, on_event=seen.append)
    try:
        with anyio.CancelScope() as outer:
            await flow.arun()
    finally:
        release.set()

    result = flow.results["last"]
    assert (result.state, result.reason) == (StepState.CANCELLED, "the run was cancelled while it was running")
    about_last = [type(e).__name__ for e in seen if getattr(e, "task", None) == "last"]
    assert about_last == ["TaskStarted", "ThreadAbandoned", "TaskFinished"]


async def test_each_link_of_a_chain_gets_a_fresh_copy_of_the_runs_context() -> None:
    def link(**previous: str) -> str:
        seen = marker.get()
        marker.set("changed by a link")
        return seen

    chain = _chain(3, link)
    token = marker.set("set by the caller")
    try:
        results = await Flow(chain[-1]).arun()
    finally:
        marker.reset(token)
    assert [results[t.name].value for t in chain] == ["set by the caller"] * 3


async def test_tasks_started_after_a_sync_task_see_the_callers_context_variables() -> None:
    @task
    def plain_first() -> int:
        return 1

    @task(depends_on=[plain_first])
    async def async_after(plain_first: int) -> str:
        return marker.get()

    @task(depends_on=[plain_first], retry=1)
    def retried_after(plain_first: int) -> str:
        return marker.get()

    seen_by_callback: set[str] = set()
    token = marker.set("set by the caller")
    try:
        flow = Flow(async_after, retried_after, on_event=lambda e: seen_by_callback.add(marker.get()))
        results = await flow.arun()
    finally:
        marker.reset(token)
    assert results["async_after"].value == "set by the caller"
    assert results["retried_after"].value == "set by the caller"
    assert seen_by_callback == {"set by the caller"}


def _flow_queueing_a_task_as_the_last_lane_job_ends(
    seen: list[Event], *, detached_after: bool
) -> Flow:
    """With one worker: ``late`` is queued while the job that ran ``first`` and
    ``second`` finds the queue empty and ends, and ``retried`` waits for the token."""
    wake = anyio.Event()

    @task
    def first() -> int:
        return 1

    @task(depends_on=[first])
    def second(first: int) -> int:  # first's chain successor: the same job runs it
        time.sleep(0.05)
        return 2

    @task
    async def woken() -> int:
        await wake.wait()
        return 3

    @task(depends_on=[first, woken])
    def late(first: int, woken: int) -> int:
        return first + woken

    @task(retry=1)  # not a lane task: it waits for the limiter's one token
    def retried() -> str:
        time.sleep(0.05)
        return "r"

    def on_event(event: Event) -> None:
        seen.append(event)
        if isinstance(event, TaskFinished) and event.task == "first":
            wake.set()
            time.sleep(0.2)  # holds the loop while second's job ends

    terminals: list[TaskDef[..., Any]] = [second, late, retried]
    if detached_after:
        terminals.append(task(lambda retried: "sent", name="notify", depends_on=[retried], detached=True))
    return Flow(*terminals, max_workers=1, on_event=on_event)


@on_asyncio
@pytest.mark.parametrize("detached_after", [False, True])
async def test_a_task_queued_as_the_last_lane_job_ends_still_runs_once(detached_after: bool) -> None:
    seen: list[Event] = []
    flow = _flow_queueing_a_task_as_the_last_lane_job_ends(seen, detached_after=detached_after)
    with anyio.fail_after(10):
        results = await flow.arun()
    assert all(r.succeeded for r in results.values()), results
    assert [e.task for e in seen if isinstance(e, TaskFinished)].count("late") == 1


def test_a_keyboard_interrupt_from_a_sync_body_stops_the_lanes_without_fail_fast(
    anyio_backend: str,
) -> None:
    interrupted = threading.Event()
    started_after: list[int] = []

    def quick(k: int) -> TaskDef[..., Any]:
        def body() -> None:
            if interrupted.is_set():
                started_after.append(k)

        return task(body, name=f"quick{k}")

    @task
    def interrupts() -> None:
        interrupted.set()
        raise KeyboardInterrupt

    flow = Flow(interrupts, *[quick(k) for k in range(200)], max_workers=1, fail_fast=False)
    assert flow.tasks[0].name == "interrupts"  # so the others are queued behind it
    with pytest.raises(KeyboardInterrupt):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
    assert len(started_after) <= 1  # at most one already taken when the thread saw it


@on_asyncio  # on trio a run's values wait for the collector (trio's own cycles)
def test_a_runs_values_are_freed_without_the_garbage_collector(anyio_backend: str) -> None:
    class Value:
        pass

    made: list[weakref.ref[Value]] = []

    @task
    def make() -> Value:
        value = Value()
        made.append(weakref.ref(value))
        return value

    flow = Flow(make)
    gc.collect()
    gc.disable()
    try:
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
        assert made[0]() is None, "the first run's results outlived it"
    finally:
        gc.enable()


async def test_a_sync_task_waiting_for_a_thread_is_not_starved_by_queued_lane_tasks() -> None:
    order: list[str] = []
    one_ran = threading.Event()

    def lane_body(k: int) -> TaskDef[..., Any]:
        def body() -> None:
            order.append(f"lane{k}")
            one_ran.set()
            time.sleep(0.01)

        return task(body, name=f"lane{k}")

    @task
    async def gate() -> None:
        await anyio.to_thread.run_sync(one_ran.wait, 10)

    @task(depends_on=[gate], retry=1)  # not a lane task: it waits for a token
    def urgent(gate: None) -> None:
        order.append("urgent")

    lanes = [lane_body(k) for k in range(50)]
    results = await Flow(*lanes, urgent, max_workers=1).arun()
    assert all(r.succeeded for r in results.values())
    assert order.index("urgent") < 25, order  # not after every queued lane task


@on_asyncio
async def test_a_worker_thread_that_cannot_start_ends_the_run_with_that_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flowing import _threads

    submit = _threads.Workers.submit
    submitted = 0

    def fails_second(self: _threads.Workers, job: Any) -> None:
        nonlocal submitted
        submitted += 1
        if submitted == 2:
            raise RuntimeError("can't start new thread")
        submit(self, job)

    monkeypatch.setattr(_threads.Workers, "submit", fails_second)

    @task
    def first() -> int:
        return 1

    fan = [task(lambda first: first, name=f"fan{k}", depends_on=[first]) for k in range(4)]
    flow = Flow(*fan, max_workers=2)
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="can't start new thread"):
        await flow.arun()
    assert set(flow.results) == {"first", *(t.name for t in fan)}
    states = {r.state for r in flow.results.values()}
    assert states <= {StepState.SUCCEEDED, StepState.CANCELLED}, flow.results


@on_asyncio
def test_a_keyboard_interrupt_is_raised_even_when_another_lane_job_ends_first(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowing import _lanes

    note_failure = _lanes.Lanes._note_failure

    def reported_late(self: _lanes.Lanes, task: Any, error: BaseException) -> None:
        note_failure(self, task, error)
        time.sleep(0.2)  # the thread is preempted before it reports the interrupt

    monkeypatch.setattr(_lanes.Lanes, "_note_failure", reported_late)
    side_effects: list[str] = []

    @task
    def interrupted() -> None:
        time.sleep(0.05)
        raise KeyboardInterrupt

    @task
    def other() -> int:
        time.sleep(0.1)  # its job ends after the lanes stopped, before the interrupt is heard
        return 1

    @task(depends_on=[other], detached=True)
    def side_effect(other: int) -> None:
        side_effects.append("ran")

    flow = Flow(interrupted, side_effect, max_workers=2, fail_fast=False)
    with pytest.raises(KeyboardInterrupt):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
    assert flow.results["interrupted"].state is StepState.FAILED
    assert side_effects == []


async def test_a_sync_task_is_not_starved_by_a_stream_of_mapped_instances() -> None:
    order: list[str] = []

    @task
    def items() -> list[int]:
        return list(range(100))

    @task(depends_on=[items], map_over="items")  # each instance waits for a token
    def mapped(items: int) -> int:
        order.append("item")
        time.sleep(0.002)
        return items

    @task
    async def soon() -> None:
        while "item" not in order:
            await anyio.sleep(0.005)
        order.append("ready")

    @task(depends_on=[soon])
    def plain(soon: None) -> None:  # a lane task on asyncio
        order.append("plain")

    results = await Flow(mapped, plain, max_workers=1).arun()
    assert all(r.succeeded for r in results.values())
    items_between = order.index("plain") - order.index("ready") - 1
    assert items_between < 30, order  # not after every remaining instance


@on_asyncio
@pytest.mark.parametrize(
    ("how", "taken_by"),
    [("queued", "_take"), ("chained", "_following")],
    ids=["queued-task", "chain-successor"],
)
async def test_a_body_taken_just_before_the_run_was_cancelled_and_ended_never_runs(
    monkeypatch: pytest.MonkeyPatch, how: str, taken_by: str
) -> None:
    """A lane thread took `second` (from the queue, or as the next link of its chain),
    then the run was cancelled and ended before the body started: it must not run
    unseen, after the run reported it never started."""
    from flowing import _lanes

    token = anyio.lowlevel.current_token()
    flow_over, job_over = threading.Event(), threading.Event()
    ran: list[str] = []

    def first() -> int:
        ran.append("first")
        return 1

    def second(**_: int) -> int:
        ran.append("second")
        return 2

    first_task = task(first)
    second_task = task(second, depends_on=[first_task] if how == "chained" else [])
    real_taken_by, real_run_job = getattr(_lanes.Lanes, taken_by), _lanes.Lanes.run_job

    def taken(self: Any, *args: Any) -> Any:
        taken_now = real_taken_by(self, *args)
        index = taken_now[0] if isinstance(taken_now, tuple) else taken_now
        if index is not None and self._tasks[index].name == "second":
            anyio.from_thread.run_sync(outer.cancel, token=token)
            assert flow_over.wait(10)
        return taken_now

    def run_job(self: Any, job: Any) -> None:
        try:
            real_run_job(self, job)
        finally:
            job_over.set()

    monkeypatch.setattr(_lanes.Lanes, taken_by, taken)
    monkeypatch.setattr(_lanes.Lanes, "run_job", run_job)
    seen: list[Event] = []

    def on_event(event: Event) -> None:
        seen.append(event)
        if type(event).__name__ == "FlowFinished":
            flow_over.set()

    flow = Flow(first_task, second_task, max_workers=1, on_event=on_event)
    with anyio.CancelScope() as outer:
        await flow.arun()
    assert job_over.wait(10)
    assert "second" not in ran
    assert flow.results["second"].state is StepState.CANCELLED
    assert not [e for e in seen if isinstance(e, TaskStarted) and e.task == "second"]
