"""Sync bodies in the run's own worker threads: what a body sees, and what a run leaves."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest

from flowing import Flow, StepState, task
from flowing._threads import LoopInbox

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flowing worker"]


async def test_a_sync_body_can_call_back_into_the_event_loop_with_anyio_from_thread() -> None:
    called_on_loop = anyio.Event()

    @task
    def calls_back() -> str:
        anyio.from_thread.run_sync(called_on_loop.set)
        return "done"

    results = await Flow(calls_back).arun()
    assert results["calls_back"].value == "done"
    assert called_on_loop.is_set()


async def test_a_sync_body_sees_the_context_variables_of_the_run() -> None:
    @task
    def reads_context() -> str:
        return request_id.get()

    token = request_id.set("req-42")
    try:
        results = await Flow(reads_context).arun()
    finally:
        request_id.reset(token)
    assert results["reads_context"].value == "req-42"


async def test_an_exception_from_a_sync_body_is_recorded_with_its_type() -> None:
    @task
    def fails() -> None:
        raise LookupError("no such row")

    results = await Flow(fails, fail_fast=False).arun()
    assert results["fails"].state is StepState.FAILED
    assert isinstance(results["fails"].error, LookupError)


async def test_the_worker_threads_of_a_run_end_with_the_run() -> None:
    @task
    def fails() -> None:
        raise ValueError("kept in the results, with its traceback")

    before = set(_worker_threads())
    flow = Flow(fails, max_workers=3)
    await flow.arun()
    with anyio.fail_after(5):
        while set(_worker_threads()) - before:
            await anyio.sleep(0.01)
    assert flow.results["fails"].state is StepState.FAILED


async def test_queued_sync_tasks_that_never_started_are_skipped_after_a_failure() -> None:
    """max_workers=1 and five ready sync tasks: after the first fails, fail_fast starts no other."""
    calls = 0

    @task
    def root() -> int:
        return 0

    def child(name: str) -> Any:
        def body(root: int) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ValueError("the first child to run fails")
            return root

        return task(body, name=name, depends_on=[root])

    children = [child(f"child{i}") for i in range(5)]
    results = await Flow(*children, max_workers=1).arun()
    states = [results[c.name].state for c in children]
    assert calls == 1
    assert states.count(StepState.FAILED) == 1
    assert states.count(StepState.SKIPPED) == 4
    assert all(
        "fail_fast" in (results[c.name].reason or "")
        for c in children
        if results[c.name].state is StepState.SKIPPED
    )


@pytest.mark.parametrize("max_workers", [1, 2, 5])
async def test_a_wide_fan_out_of_sync_tasks_holds_at_most_max_workers_threads(
    max_workers: int,
) -> None:
    lock = threading.Lock()
    running = 0
    peak = 0

    @task
    def root() -> int:
        return 0

    def leaf(**_: Any) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        with lock:
            running -= 1

    leaves = [task(leaf, name=f"leaf{i}", depends_on=[root]) for i in range(200)]
    results = await Flow(*leaves, max_workers=max_workers).arun()
    assert all(r.succeeded for r in results.values())
    assert 1 <= peak <= max_workers


async def test_sync_tasks_held_back_by_fail_fast_stay_skipped_through_the_detached_phase() -> None:
    ran: list[str] = []

    @task
    def root() -> int:
        return 0

    def child(name: str) -> Any:
        def body(root: int) -> int:
            ran.append(name)
            if len(ran) == 1:
                raise ValueError("the first child to run fails")
            return root

        return task(body, name=name, depends_on=[root])

    @task(depends_on=[root], detached=True)
    def notify(root: int) -> str:
        return "sent"

    children = [child(f"child{i}") for i in range(4)]
    results = await Flow(*children, max_workers=1).arun()
    assert len(ran) == 1
    assert results["notify"].value == "sent"
    skipped = [c.name for c in children if results[c.name].state is StepState.SKIPPED]
    assert len(skipped) == 3


async def test_without_anyios_private_thread_details_sync_bodies_use_anyio_to_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("flowing._threads._FAST_PATH", False)
    called_on_loop = anyio.Event()

    @task
    def first() -> str:
        anyio.from_thread.run_sync(called_on_loop.set)
        return threading.current_thread().name

    @task(depends_on=[first])
    def second(first: str) -> str:
        return first + "!"

    results = await Flow(second).arun()
    assert results["second"].value not in ("MainThread!", "flowing worker!")
    assert results["second"].succeeded and called_on_loop.is_set()


async def test_a_worker_thread_that_cannot_start_gives_its_token_back(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed_once: list[bool] = []
    if anyio_backend == "asyncio":  # the run's own worker threads
        start = threading.Thread.start

        def fails_first_worker(thread: threading.Thread) -> None:
            if thread.name == "flowing worker" and not failed_once:
                failed_once.append(True)
                raise RuntimeError("can't start new thread")
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", fails_first_worker)
    else:  # trio: anyio's threads
        run_sync = anyio.to_thread.run_sync

        async def fails_first_call(*args: Any, **kwargs: Any) -> Any:
            if not failed_once:
                failed_once.append(True)
                raise RuntimeError("can't start new thread")
            return await run_sync(*args, **kwargs)

        monkeypatch.setattr(anyio.to_thread, "run_sync", fails_first_call)

    @task(retry=1, retry_backoff_base_ms=1)  # not a lane task: it waits for a token
    def first() -> int:
        return 1

    @task
    async def later() -> int:
        await anyio.sleep(0.01)
        return 1

    @task(depends_on=[later])
    def after(later: int) -> int:  # needs the one token
        return 2

    flow = Flow(first, after, max_workers=1, fail_fast=False)
    with anyio.fail_after(10):
        results = await flow.arun()
    assert results["first"].value == 1 and results["first"].attempts == 2  # the retry ran
    assert results["after"].value == 2


def test_a_closed_inbox_delivers_what_was_pending_and_refuses_the_rest() -> None:
    scheduled: list[Callable[[], None]] = []
    delivered: list[list[str]] = []
    inbox: LoopInbox[str] = LoopInbox(scheduled.append, delivered.append)

    assert inbox.put("started") is True
    inbox.close()
    assert inbox.put("returned") is False
    for deliver in scheduled:  # the delivery scheduled by the first put comes late
        deliver()
    assert delivered == [["started"]]
