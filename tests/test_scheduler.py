"""The async core: start order, thread bounds, fail_fast, skips and the detached phase."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import anyio
import pytest

from flowing import Flow, StepState, TaskDef, TaskFinished, TaskStarted, task
from flowing._runners import BEGIN_AHEAD

from _tracker import Rendezvous

pytestmark = pytest.mark.anyio


async def test_a_task_starts_when_its_own_dependencies_finish_not_its_layer() -> None:
    """Chain b1 -> b2 -> b3 completes while a1, in the same first layer, is still running."""
    b3_done = anyio.Event()

    @task
    async def a1() -> str:
        await b3_done.wait()  # a layer barrier would deadlock here
        return "a1"

    @task
    async def b1() -> int:
        return 1

    @task(depends_on=[b1])
    async def b2(b1: int) -> int:
        return b1 + 1

    @task(depends_on=[b2])
    async def b3(b2: int) -> int:
        b3_done.set()
        return b2 + 1

    @task(depends_on=[a1, b3])
    def join(a1: str, b3: int) -> str:
        return f"{a1}:{b3}"

    flow = Flow(join)
    with anyio.fail_after(5):
        results = await flow.arun()
    assert results["join"].value == "a1:3"


async def test_sync_bodies_never_exceed_max_workers_threads() -> None:
    barrier = threading.Barrier(3, timeout=5)
    lock = threading.Lock()
    running = 0
    peak = 0

    def body() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        barrier.wait()  # needs exactly 3 at once: fewer would time out
        with lock:
            running -= 1

    tasks = [task(body, name=f"t{i}") for i in range(9)]
    results = await Flow(*tasks, max_workers=3).arun()
    assert all(r.succeeded for r in results.values()), Flow(*tasks).summary()
    assert peak == 3


async def test_async_bodies_are_not_bounded_by_max_workers() -> None:
    count = 0
    everyone_in = anyio.Event()

    async def body() -> None:
        nonlocal count
        count += 1
        if count == 20:
            everyone_in.set()
        await everyone_in.wait()

    tasks = [task(body, name=f"t{i}") for i in range(20)]
    with anyio.fail_after(5):
        results = await Flow(*tasks, max_workers=1).arun()
    assert all(r.succeeded for r in results.values())


async def test_async_bodies_run_on_the_event_loop_thread() -> None:
    loop_thread = threading.get_ident()

    @task
    async def where() -> int:
        return threading.get_ident()

    @task
    def where_sync() -> int:
        return threading.get_ident()

    flow = Flow(where, where_sync)
    await flow.arun()
    assert flow.value(where) == loop_thread
    assert flow.value(where_sync) != loop_thread


async def test_fail_fast_lets_running_tasks_finish_and_starts_nothing_new() -> None:
    slow_started = anyio.Event()

    @task
    async def slow() -> str:
        slow_started.set()
        await anyio.sleep(0.2)
        return "kept"

    @task
    async def boom() -> None:
        await slow_started.wait()
        raise RuntimeError("boom")

    @task(depends_on=[slow])
    def after_slow(slow: str) -> str:
        return slow

    @task(depends_on=[boom])
    def after_boom(boom: None) -> None: ...

    flow = Flow(after_slow, after_boom, fail_fast=True)
    results = await flow.arun()
    assert results["slow"].state is StepState.SUCCEEDED
    assert results["slow"].value == "kept"
    assert results["boom"].state is StepState.FAILED
    assert results["after_boom"].state is StepState.SKIPPED
    assert results["after_boom"].reason == "dependency 'boom' failed"
    assert results["after_slow"].state is StepState.SKIPPED
    assert "fail_fast" in (results["after_slow"].reason or "")
    assert "'boom'" in (results["after_slow"].reason or "")


async def test_without_fail_fast_every_task_whose_dependencies_succeeded_runs() -> None:
    @task
    def ok() -> int:
        return 1

    @task
    def bad() -> None:
        raise ValueError("nope")

    @task(depends_on=[ok])
    def after_ok(ok: int) -> int:
        return ok + 1

    @task(depends_on=[bad])
    def after_bad(bad: None) -> None: ...

    @task(depends_on=[after_bad])
    def grandchild(after_bad: None) -> None: ...

    results = await Flow(after_ok, grandchild, fail_fast=False).arun()
    assert results["after_ok"].value == 2
    assert results["bad"].state is StepState.FAILED
    assert isinstance(results["bad"].error, ValueError)
    assert results["after_bad"].state is StepState.SKIPPED
    assert results["grandchild"].state is StepState.SKIPPED
    assert results["grandchild"].reason == "dependency 'after_bad' skipped"


async def test_detached_tasks_run_after_every_main_task_has_finished() -> None:
    order: list[str] = []

    @task
    def root() -> int:
        order.append("root")
        return 1

    @task(depends_on=[root], detached=True)
    def notify(root: int) -> None:
        order.append("notify")

    @task(depends_on=[notify], detached=True)
    def audit(notify: None) -> None:
        order.append("audit")

    @task(depends_on=[root])
    async def main_tail(root: int) -> None:
        await anyio.sleep(0.05)
        order.append("main_tail")

    results = await Flow(main_tail).arun()
    assert order == ["root", "main_tail", "notify", "audit"]
    assert results["notify"].detached and results["audit"].detached


async def test_detached_failures_are_collected_and_never_trigger_fail_fast() -> None:
    @task
    def root() -> int:
        return 1

    @task(depends_on=[root], detached=True)
    def broken_side_effect(root: int) -> None:
        raise OSError("mail server down")

    @task(depends_on=[root], detached=True)
    def other_side_effect(root: int) -> str:
        return "sent"

    flow = Flow(root, fail_fast=True)
    results = await flow.arun()
    assert list(flow.detached_failures) == ["broken_side_effect"]
    assert results["other_side_effect"].value == "sent"
    assert results["root"].succeeded


async def test_detached_tasks_are_skipped_when_a_dependency_did_not_succeed() -> None:
    ran: list[str] = []

    @task
    def root() -> int:
        raise RuntimeError("no")

    @task(depends_on=[root], detached=True)
    def side(root: int) -> None:
        ran.append("side")

    results = await Flow(root).arun()
    assert ran == []
    assert results["side"].state is StepState.SKIPPED


async def test_dependency_values_arrive_as_keyword_arguments_named_after_the_dependency() -> None:
    @task(name="left")
    def produce_left() -> str:
        return "L"

    @task
    async def right() -> str:
        return "R"

    @task(depends_on=[produce_left, right])
    def combine(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    results = await Flow(combine).arun()
    assert results["combine"].value == {"left": "L", "right": "R"}


async def test_a_thousand_async_sleeps_overlap() -> None:
    async def nap() -> None:
        await anyio.sleep(0.05)

    tasks = [task(nap, name=f"nap{i}") for i in range(1000)]
    started = time.perf_counter()
    results = await Flow(*tasks, max_workers=5).arun()
    elapsed = time.perf_counter() - started
    assert all(r.succeeded for r in results.values())
    assert elapsed < 1.0, f"1,000 concurrent 50 ms sleeps took {elapsed:.2f} s"


async def test_every_task_of_a_wide_fan_out_is_waiting_at_once_though_runners_begin_a_few_at_a_time() -> None:
    width = 3 * BEGIN_AHEAD
    rendezvous = Rendezvous(width)

    @task
    def root() -> int:
        return 0

    def waiter(k: int) -> TaskDef[..., int]:
        async def wait_for_all(root: int) -> int:
            return await rendezvous.arrive(k)

        return task(wait_for_all, name=f"w{k}", depends_on=[root])

    with anyio.fail_after(10):
        results = await Flow(*[waiter(k) for k in range(width)]).arun()

    assert sorted(rendezvous.arrived) == list(range(width))
    assert all(r.succeeded for r in results.values())


async def test_a_wide_fan_out_of_quick_tasks_keeps_few_runners_waiting_to_begin() -> None:
    width = 20 * BEGIN_AHEAD
    seen: list[int] = []

    @task
    def root() -> int:
        return 0

    async def count_tasks(root: int) -> None:
        seen.append(len(anyio.get_running_tasks()))

    quick = [task(count_tasks, name=f"q{k}", depends_on=[root]) for k in range(width)]
    await Flow(*quick).arun()

    assert len(seen) == width
    assert max(seen) <= BEGIN_AHEAD + 10, "the fan-out's tasks were made all at once"


@pytest.mark.parametrize("extra", [0, 1, 2, 3])  # where the fan-out's last runner ends its start
async def test_a_queued_thread_bound_task_starts_when_a_thread_frees_though_a_wide_fan_out_hit_the_begin_bound(
    extra: int,
) -> None:
    """``first`` holds the one thread while ``second`` queues; ``first`` frees it and makes
    a wide fan-out ready at once, whose tasks wait for ``second`` to start."""
    second_started = anyio.Event()

    def on_event(event: Any) -> None:
        if isinstance(event, TaskStarted) and event.task == "second":
            second_started.set()

    @task
    async def root() -> int:
        return 0

    # A timeout keeps them out of the thread lanes: they queue in the scheduler.
    @task(depends_on=[root], timeout_s=30)
    def first(root: int) -> int:
        return 0

    @task(depends_on=[root], timeout_s=30)
    def second(root: int) -> int:
        return 0

    def waiter(k: int) -> TaskDef[..., Any]:
        @task(name=f"w{k}", depends_on=[first])
        async def wait_for_second(first: int) -> int:
            await second_started.wait()  # deadlocks unless a runner that begins starts `second`
            return k

        return wait_for_second

    waiters = [waiter(k) for k in range(3 * BEGIN_AHEAD + extra)]
    with anyio.fail_after(10):
        results = await Flow(*waiters, second, max_workers=1, on_event=on_event).arun()

    assert all(r.succeeded for r in results.values())


@pytest.mark.parametrize("interrupted_at", ["w5", "w100", "w150"])
async def test_no_task_starts_once_an_event_observer_raised_keyboardinterrupt(interrupted_at: str) -> None:
    """Ready tasks the begin bound left waiting are not started by a runner that goes on."""
    interrupted = False
    started_after: list[str] = []

    def on_event(event: Any) -> None:
        nonlocal interrupted
        if isinstance(event, TaskStarted) and interrupted:
            started_after.append(event.task)
        if isinstance(event, TaskFinished) and event.task == interrupted_at:
            interrupted = True
            raise KeyboardInterrupt

    @task
    async def root() -> int:
        return 0

    def quick(k: int) -> TaskDef[..., Any]:
        @task(name=f"w{k}", depends_on=[root])
        async def never_suspends(root: int) -> int:
            return k

        return never_suspends

    flow = Flow(*[quick(k) for k in range(3 * BEGIN_AHEAD)], on_event=on_event)
    with anyio.fail_after(10), pytest.raises(KeyboardInterrupt):
        await flow.arun()

    assert started_after == []
    assert len(flow.results) == 3 * BEGIN_AHEAD + 1


def test_uneven_chains_finish_in_about_their_critical_path() -> None:
    """100/10/100... ms and 10/100/10... ms chains: 0.55 s critical path, ~1 s with layer barriers."""

    def chain(prefix: str, durations: list[float]) -> Any:
        previous = None
        for i, seconds in enumerate(durations):

            def sleep(_: float = seconds, **__: Any) -> None:
                time.sleep(_)

            previous = task(sleep, name=f"{prefix}{i}", depends_on=[previous] if previous else [])
        return previous

    long_short = [0.1 if i % 2 == 0 else 0.01 for i in range(10)]
    short_long = [0.01 if i % 2 == 0 else 0.1 for i in range(10)]
    flow = Flow(chain("a", long_short), chain("b", short_long))
    started = time.perf_counter()
    flow.run()
    elapsed = time.perf_counter() - started
    assert all(r.succeeded for r in flow.results.values())
    assert elapsed < 0.8, f"took {elapsed:.2f} s; a layer barrier costs ~1 s"


@pytest.mark.parametrize("retry", [0, 1], ids=["thread-bound", "with-retry"])
async def test_fail_fast_holds_back_sync_bodies_still_waiting_for_a_worker_thread(
    retry: int,
) -> None:
    """With one thread, whichever sleeper gets it runs to the end; the other one,
    claimed but still waiting for the thread when boom fails, never starts its body."""
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def sleeper(name: str) -> Any:
        @task(name=name, retry=retry)
        def body() -> str:
            ran.append(name)
            started.set()
            release.wait(10)
            return name

        return body

    @task
    async def boom() -> None:
        await anyio.to_thread.run_sync(started.wait, 10)
        raise RuntimeError("boom")

    def release_after_boom(event: Any) -> None:
        if isinstance(event, TaskFinished) and event.task == "boom":
            release.set()  # the thread frees up only once fail_fast has stopped the run

    flow = Flow(sleeper("a"), sleeper("b"), boom, max_workers=1, on_event=release_after_boom)
    results = await flow.arun()
    (first,) = ran
    other = "b" if first == "a" else "a"
    assert (results[first].state, results[first].value) == (StepState.SUCCEEDED, first)
    assert (results[other].state, results[other].attempts) == (StepState.SKIPPED, 0)
    assert results[other].reason == "not started: fail_fast stopped the run after 'boom' failed"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in 3.12")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_an_eager_task_factory_each_task_runs_once() -> None:
    import asyncio

    runs: list[str] = []

    @task
    async def first() -> int:  # finishes inside create_task: its dependent is claimed there
        runs.append("first")
        return 1

    @task(depends_on=[first])
    async def suspends(first: int) -> int:
        runs.append("suspends")
        await anyio.sleep(0)
        return 2

    @task(depends_on=[suspends, first])
    async def last(suspends: int, first: int) -> int:
        runs.append("last")
        return 3

    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    try:
        with anyio.fail_after(10):
            results = await Flow(last, max_workers=1).arun()
    finally:
        loop.set_task_factory(None)
    assert results["last"].value == 3
    assert sorted(runs) == ["first", "last", "suspends"]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in 3.12")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_an_eager_task_factory_a_wide_fan_out_of_quick_tasks_runs_each_task_once() -> None:
    import asyncio

    ran: list[int] = []

    @task
    def root() -> int:
        return 0

    def quick(k: int) -> TaskDef[..., int]:
        async def never_suspends(root: int) -> int:
            ran.append(k)
            return k

        return task(never_suspends, name=f"q{k}", depends_on=[root])

    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    try:
        with anyio.fail_after(10):
            results = await Flow(*[quick(k) for k in range(20 * BEGIN_AHEAD)]).arun()
    finally:
        loop.set_task_factory(None)
    assert sorted(ran) == list(range(20 * BEGIN_AHEAD))
    assert all(r.succeeded for r in results.values())
