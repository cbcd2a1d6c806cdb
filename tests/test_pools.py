"""Concurrency limits: named pools, per-task limits and start rates, sync and async alike."""

from __future__ import annotations

import math
import threading
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from flowing import (
    Flow,
    InvalidPoolError,
    InvalidTaskError,
    Pool,
    StepState,
    TaskFinished,
    TaskStarted,
    ThreadAbandoned,
    ThreadExecutor,
    UnknownPoolError,
    task,
)
from flowing._pools import StartRate

from _tracker import Tracker

WAIT_S = 10  # a generous bound: only reached when a limit is broken


class AsyncTracker(Tracker):
    """A Tracker whose async bodies wait on ``async_release``; create it inside the event loop."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.async_release = anyio.Event()

    async def wait_released(self) -> None:
        with anyio.move_on_after(WAIT_S):
            await self.async_release.wait()


def _workers(tracker: AsyncTracker, count: int, is_async: bool, **options: Any) -> list[Any]:
    """``count`` independent tasks that each hold a slot until the controller releases them."""

    async def async_body() -> None:
        tracker.enter()
        try:
            await tracker.wait_released()
        finally:
            tracker.leave()

    def sync_body() -> None:
        tracker.enter()
        try:
            tracker.release.wait(WAIT_S)
        finally:
            tracker.leave()

    body = async_body if is_async else sync_body
    return [task(name=f"worker_{n}", **options)(body) for n in range(count)]


def _controller(tracker: AsyncTracker) -> Any:
    @task
    async def controller() -> bool:
        filled = await anyio.to_thread.run_sync(tracker.full.wait, WAIT_S)
        tracker.release.set()
        tracker.async_release.set()
        return filled

    return controller


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_pool_bounds_how_many_tasks_sharing_it_run_at_once(is_async: bool) -> None:
    tracker = AsyncTracker(limit=2)
    workers = _workers(tracker, 6, is_async, pool="api")
    flow = Flow(*workers, _controller(tracker), max_workers=8, pools={"api": 2})
    results = await flow.arun()
    assert all(r.state is StepState.SUCCEEDED for r in results.values())
    assert results["controller"].value is True  # the pool was filled ...
    assert tracker.peak == 2  # ... and never overfilled


@pytest.mark.anyio
async def test_tasks_outside_the_pool_are_not_limited_by_it() -> None:
    tracker = AsyncTracker(limit=4)
    workers = _workers(tracker, 4, is_async=True)
    flow = Flow(*workers, _controller(tracker), pools={"api": 1})
    results = await flow.arun()
    assert results["controller"].value is True
    assert tracker.peak == 4


@pytest.mark.anyio
async def test_the_pool_slot_is_released_between_retries_and_after_failures() -> None:
    calls: list[str] = []

    @task(pool="one", retry=2, retry_backoff_base_ms=0)
    def flaky() -> str:
        calls.append("flaky")
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    @task(pool="one")
    def broken() -> None:
        raise ValueError("no")

    @task(pool="one")
    def steady() -> str:
        return "ok"

    flow = Flow(flaky, broken, steady, pools={"one": Pool(1)}, fail_fast=False)
    results = await flow.arun()
    assert [results[n].state for n in ("flaky", "broken", "steady")] == [
        StepState.SUCCEEDED,
        StepState.FAILED,
        StepState.SUCCEEDED,
    ]
    assert results["flaky"].attempts == 3


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (2, [0, 0, 1, 1, 2, 2]),
        (0.5, [0, 2, 4, 6, 8, 10]),
        (2.5, [0, 0, 0.8, 0.8, 1.6, 1.6]),
        (100, [0] * 6),
        (1e20, [0] * 6),
    ],
    ids=["two-per-second", "one-every-two-seconds", "fractional", "under-the-burst", "beyond-any-burst"],
)
def test_a_start_rate_admits_a_burst_then_waits_for_the_window(
    rate: float, expected: list[float]
) -> None:
    async def starts() -> list[float]:
        gate = StartRate(rate)
        origin = anyio.current_time()
        times: list[float] = []

        async def start() -> None:
            await gate.wait_turn()
            times.append(anyio.current_time() - origin)

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(start)
        return times

    clock = MockClock(autojump_threshold=0)
    times = anyio.run(starts, backend="trio", backend_options={"clock": clock})
    assert times == pytest.approx(expected)


@pytest.mark.anyio
async def test_a_pool_rate_spaces_attempt_starts_in_a_real_run() -> None:
    starts: list[float] = []

    def make(n: int) -> Any:
        @task(name=f"call_{n}", pool="quota")
        async def call() -> None:
            starts.append(anyio.current_time())

        return call

    await Flow(*[make(n) for n in range(4)], pools={"quota": Pool(rate=3)}).arun()
    starts.sort()
    assert len(starts) == 4
    assert starts[3] - starts[0] >= 1.0 - 1e-3  # the 4th start waits for the 1 s window


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Pool(0), InvalidPoolError, "Pool size must be None or an int >= 1, got 0"),
        (lambda: Pool(True), InvalidPoolError, "got True"),
        (lambda: Pool(2.5), InvalidPoolError, "got 2.5"),  # type: ignore[arg-type]
        (lambda: Pool(rate=0), InvalidPoolError, "Pool rate must be None or a number"),
        (lambda: Pool(rate=-1), InvalidPoolError, "got -1"),
        (lambda: Pool(rate=math.nan), InvalidPoolError, "got nan"),
        (lambda: Pool(rate=math.inf), InvalidPoolError, "got inf"),
        (lambda: Pool(rate="10/s"), InvalidPoolError, "got '10/s'"),  # type: ignore[arg-type]
        (lambda: task(pool=3)(lambda: 0), InvalidTaskError, "pool of task '<lambda>'"),
        (lambda: task(pool="")(lambda: 0), InvalidTaskError, "must be None or the name"),
        (lambda: task(max_concurrency=0)(lambda: 0), InvalidTaskError, "max_concurrency"),
        (lambda: task(max_concurrency=True)(lambda: 0), InvalidTaskError, "got True"),
        (lambda: task(max_concurrency=2)(lambda: 0), InvalidTaskError, "but it has no map_over"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_bad_limits_are_rejected_with_the_culprit_named(
    make: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        make()
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        ({"api": 0}, "pool 'api' must be an int >= 1 (its size) or a Pool"),
        ({"api": "3"}, "got '3'"),
        ({"": 3}, "pool names must be non-empty strings"),
        ([("api", 3)], "pools must be a dict"),
    ],
)
def test_bad_flow_pools_are_rejected(pools: Any, message: str) -> None:
    with pytest.raises(InvalidPoolError) as info:
        Flow(task(pool="api")(lambda: 0), pools=pools)
    assert message in str(info.value)


def test_a_task_naming_an_undefined_pool_is_rejected_before_anything_runs() -> None:
    @task(pool="apii")
    def fetch() -> None: ...

    with pytest.raises(UnknownPoolError) as info:
        Flow(fetch, pools={"api": 3, "db": 1})
    assert str(info.value) == (
        "task 'fetch' uses pool 'apii', which this Flow does not define "
        "(defined: 'api', 'db'); add Flow(pools={'apii': <size>})"
    )
    assert (info.value.task, info.value.pool) == ("fetch", "apii")


@pytest.mark.anyio
async def test_an_attempt_reports_started_only_once_it_holds_a_pool_slot() -> None:
    log: list[str] = []

    def make(name: str) -> Any:
        @task(name=name, pool="one")
        async def body() -> None:
            log.append(f"{name} body ends")

        return body

    def on_event(event: Any) -> None:
        if isinstance(event, TaskStarted):
            log.append(f"{event.task} started")

    await Flow(make("a"), make("b"), pools={"one": 1}, on_event=on_event).arun()
    first, second = log[0].split()[0], log[2].split()[0]
    assert log == [
        f"{first} started",
        f"{first} body ends",
        f"{second} started",
        f"{second} body ends",
    ]


@pytest.mark.anyio
async def test_waiting_for_a_pool_slot_does_not_count_against_timeout_s() -> None:
    holder_started = anyio.Event()
    release = anyio.Event()

    @task(pool="one")
    async def holder() -> None:
        holder_started.set()
        with anyio.move_on_after(WAIT_S):
            await release.wait()

    @task
    async def holder_has_the_slot() -> None:
        await holder_started.wait()

    @task(depends_on=[holder_has_the_slot], pool="one", timeout_s=0.2)
    async def quick(holder_has_the_slot: None) -> str:
        return "ok"

    @task
    async def controller() -> None:
        await holder_started.wait()
        await anyio.sleep(0.5)  # quick waits for the slot well past its timeout_s
        release.set()

    results = await Flow(holder, quick, controller, pools={"one": 1}).arun()
    assert (results["quick"].state, results["quick"].attempts) == (StepState.SUCCEEDED, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("executor", [None, ThreadExecutor()], ids=["default", "explicit-default"])
async def test_a_sync_body_abandoned_after_a_timeout_keeps_its_pool_slot_until_it_returns(
    executor: ThreadExecutor | None,
) -> None:
    a_returned = threading.Event()
    abandoned = anyio.Event()

    @task(pool="one", timeout_s=0.1)
    def slow() -> None:
        threading.Event().wait(0.5)  # outlives its timeout, then returns
        a_returned.set()

    @task
    async def after_abandon() -> None:
        with anyio.fail_after(WAIT_S):
            await abandoned.wait()

    @task(depends_on=[after_abandon], pool="one")
    def next_in_pool(after_abandon: None) -> bool:
        return a_returned.is_set()

    def on_event(event: Any) -> None:
        if isinstance(event, ThreadAbandoned):
            abandoned.set()

    flow = Flow(
        slow, next_in_pool, pools={"one": 1}, fail_fast=False, on_event=on_event, executor=executor
    )
    results = await flow.arun()
    assert isinstance(results["slow"].error, TimeoutError)
    assert results["next_in_pool"].value is True  # it ran only once slow's thread was done


@pytest.mark.anyio
async def test_fail_fast_holds_back_an_async_task_still_waiting_for_its_pool() -> None:
    pool_in_use = anyio.Event()
    boom_failed = anyio.Event()
    started: list[str] = []

    def on_event(event: Any) -> None:
        if isinstance(event, TaskStarted):
            started.append(event.task)
            if event.task.startswith("pooled"):
                pool_in_use.set()
        if isinstance(event, TaskFinished) and event.task == "boom":
            boom_failed.set()

    def pooled(k: int) -> Any:
        async def body() -> None:
            await boom_failed.wait()  # holds the pool's one slot until boom failed

        return task(body, name=f"pooled{k}", pool="one")

    @task
    async def boom() -> None:
        await pool_in_use.wait()  # the other pooled task now waits for the slot
        raise ValueError("boom")

    results = await Flow(pooled(0), pooled(1), boom, pools={"one": 1}, on_event=on_event).arun()
    by_state = {results[f"pooled{k}"].state: f"pooled{k}" for k in range(2)}
    assert set(by_state) == {StepState.SUCCEEDED, StepState.SKIPPED}
    held = by_state[StepState.SKIPPED]
    assert results[held].reason == "not started: fail_fast stopped the run after 'boom' failed"
    assert held not in started
