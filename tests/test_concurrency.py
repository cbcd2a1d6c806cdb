"""Concurrency rules: one run per Flow object; Flows sharing tasks are independent;
a task may run a nested Flow without deadlocking the parent's thread limiter."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread
import pytest

from flowing import Flow, FlowAlreadyRunningError, task

# Generous: a deadlock shows up as a timeout, not as a hung test suite.
DEADLOCK_S = 20.0


def test_the_same_flow_run_from_two_threads_at_once_is_refused(anyio_backend: str) -> None:
    started = threading.Event()
    release = threading.Event()

    @task
    def hold() -> int:
        started.set()
        release.wait(DEADLOCK_S)
        return 1

    flow = Flow(hold)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(flow.run, backend=anyio_backend)
        assert started.wait(DEADLOCK_S)
        try:
            for second_call in (flow.run, flow.resume):
                with pytest.raises(FlowAlreadyRunningError, match="already running"):
                    second_call(backend=anyio_backend)  # type: ignore[operator]
        finally:
            release.set()
        assert first.result(DEADLOCK_S)["hold"].value == 1
    assert flow.run(backend=anyio_backend)["hold"].value == 1  # type: ignore[arg-type]


def _shared_tasks(meeting: threading.Barrier) -> Any:
    """Tasks whose middle step returns only once two runs are inside it at the same time."""

    @task
    def source() -> int:
        return 0

    @task(depends_on=[source])
    def meet(source: int) -> int:
        meeting.wait()
        return source * 10

    @task(depends_on=[meet])
    async def finish(meet: int) -> int:
        await anyio.sleep(0)
        return meet + 1

    return source, finish


def test_two_flows_of_the_same_tasks_run_at_once_in_threads(anyio_backend: str) -> None:
    source, finish = _shared_tasks(threading.Barrier(2, timeout=DEADLOCK_S))
    flows = [Flow(finish), Flow(finish)]
    flows[0].override(source, 1)
    flows[1].override(source, 2)

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(f.run, backend=anyio_backend) for f in flows]
        values = [run.result(DEADLOCK_S)["finish"].value for run in runs]

    assert values == [11, 21]


@pytest.mark.anyio
async def test_two_flows_of_the_same_tasks_run_at_once_as_async_tasks() -> None:
    source, finish = _shared_tasks(threading.Barrier(2, timeout=DEADLOCK_S))
    flows = [Flow(finish), Flow(finish)]
    flows[0].override(source, 1)
    flows[1].override(source, 2)

    with anyio.fail_after(DEADLOCK_S):
        async with anyio.create_task_group() as tg:
            for flow in flows:
                tg.start_soon(flow.arun)

    assert [f.value(finish) for f in flows] == [11, 21]


def _inner_flow(ran: threading.Event) -> Flow:
    @task
    def inner_sync() -> int:
        ran.set()
        return 2

    @task(depends_on=[inner_sync])
    async def inner_async(inner_sync: int) -> int:
        return inner_sync + 1

    return Flow(inner_async, max_workers=1)


@pytest.mark.anyio
async def test_a_sync_task_can_run_a_nested_flow_while_it_holds_the_only_worker() -> None:
    @task
    def nest() -> int:
        inner = _inner_flow(threading.Event())
        return inner.run()["inner_async"].value  # type: ignore[no-any-return]

    with anyio.fail_after(DEADLOCK_S):
        results = await Flow(nest, max_workers=1).arun()

    assert results["nest"].value == 3


@pytest.mark.anyio
async def test_an_async_task_can_await_a_nested_flow_while_a_sibling_holds_the_only_worker() -> (
    None
):
    inner_ran = threading.Event()

    @task
    def hold() -> bool:
        return inner_ran.wait(DEADLOCK_S)  # returns False if the nested flow never ran

    @task
    async def nest() -> int:
        inner = _inner_flow(inner_ran)
        return (await inner.arun())["inner_async"].value  # type: ignore[no-any-return]

    with anyio.fail_after(DEADLOCK_S + 5):
        results = await Flow(hold, nest, max_workers=1).arun()

    assert results["nest"].value == 3
    assert results["hold"].value is True


@pytest.mark.anyio
@pytest.mark.parametrize("nested_call", ["run", "arun"])
async def test_a_nested_flow_is_a_separate_run_of_a_separate_flow(nested_call: str) -> None:
    outer_flow: list[Flow] = []

    @task
    def leaf() -> int:
        return 1

    async def call(flow: Flow) -> None:
        if nested_call == "arun":
            await flow.arun()
        else:
            await anyio.to_thread.run_sync(flow.run)

    @task
    async def rerun_own_flow() -> str:
        with pytest.raises(FlowAlreadyRunningError):
            await call(outer_flow[0])
        await call(Flow(leaf))
        return "ok"

    outer_flow.append(Flow(rerun_own_flow))
    results = await outer_flow[0].arun()

    assert results["rerun_own_flow"].value == "ok"

