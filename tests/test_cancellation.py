"""Cancelling a run from outside, and run deadlines, lose nothing and wait for nothing.

Async bodies are cancelled, sync bodies are abandoned in their threads (a thread
cannot be killed), every unfinished task is recorded CANCELLED, the cancellation
propagates, and ``resume()`` afterwards runs exactly the tasks that did not finish.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import pytest

from flowing import Event, Flow, FlowTimeoutError, StepState, ThreadAbandoned, task

# A sync body that the run waited for would hold the test for this long.
THREAD_BLOCKS_S = 10.0
# Far below THREAD_BLOCKS_S, far above the few milliseconds a cancellation takes.
PROMPT_S = 2.0


@dataclass
class Stalls:
    """A flow whose middle tasks block until released: one async, one sync in a thread."""

    blocking: bool = True
    release: threading.Event = field(default_factory=threading.Event)
    async_started: anyio.Event = field(default_factory=anyio.Event)
    sync_started: anyio.Event = field(default_factory=anyio.Event)
    async_saw_cancel: list[bool] = field(default_factory=list)
    sync_returned: threading.Event = field(default_factory=threading.Event)
    calls: Counter[str] = field(default_factory=Counter)
    events: list[Event] = field(default_factory=list)

    def flow(self, **options: Any) -> Flow:
        @task
        def quick() -> int:
            self.calls["quick"] += 1
            return 1

        @task(depends_on=[quick])
        async def stalled_async(quick: int) -> int:
            self.calls["stalled_async"] += 1
            if self.blocking:
                self.async_started.set()
                try:
                    await anyio.sleep_forever()
                except anyio.get_cancelled_exc_class():
                    self.async_saw_cancel.append(True)
                    raise
            return quick + 1

        @task(depends_on=[quick])
        def stalled_sync(quick: int) -> int:
            self.calls["stalled_sync"] += 1
            if self.blocking:
                anyio.from_thread.run_sync(self.sync_started.set)
                self.release.wait(THREAD_BLOCKS_S)
                self.sync_returned.set()
            return quick + 2

        @task(depends_on=[stalled_async, stalled_sync])
        def last(stalled_async: int, stalled_sync: int) -> int:
            self.calls["last"] += 1
            return stalled_async + stalled_sync

        return Flow(last, on_event=self.events.append, **options)

    async def both_started(self) -> None:
        await self.async_started.wait()
        await self.sync_started.wait()

    def assert_cancelled_cleanly(self, flow: Flow) -> None:
        states = {name: r.state for name, r in flow.results.items()}
        assert states == {
            "quick": StepState.SUCCEEDED,
            "stalled_async": StepState.CANCELLED,
            "stalled_sync": StepState.CANCELLED,
            "last": StepState.CANCELLED,
        }
        assert self.async_saw_cancel == [True]
        assert not self.sync_returned.is_set(), "the run waited for the sync thread"
        assert [e.task for e in self.events if isinstance(e, ThreadAbandoned)] == ["stalled_sync"]

    async def resume_unblocked(self, flow: Flow) -> None:
        self.release.set()
        self.blocking = False
        self.calls.clear()
        await flow.aresume()
        assert self.calls == {"stalled_async": 1, "stalled_sync": 1, "last": 1}
        assert flow.results["last"].value == 5


async def _run_cancelled_by_task_group(stalls: Stalls, flow: Flow) -> None:
    returned: list[bool] = []

    async def run() -> None:
        await flow.arun()
        returned.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await stalls.both_started()
        tg.cancel_scope.cancel()
    assert returned == [], "arun() returned normally instead of propagating the cancellation"


async def _run_under_fail_after(stalls: Stalls, flow: Flow) -> None:
    with pytest.raises(TimeoutError), anyio.fail_after(60) as scope:
        async with anyio.create_task_group() as tg:

            async def expire_once_both_started() -> None:
                await stalls.both_started()
                scope.deadline = anyio.current_time()

            tg.start_soon(expire_once_both_started)
            await flow.arun()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "cancel",
    [_run_cancelled_by_task_group, _run_under_fail_after],
    ids=["cancelled-task-group", "fail_after"],
)
async def test_cancelling_arun_from_outside_returns_promptly_and_records_the_rest_cancelled(
    cancel: Callable[[Stalls, Flow], Any],
) -> None:
    stalls = Stalls()
    flow = stalls.flow()

    started = time.monotonic()
    await cancel(stalls, flow)
    elapsed = time.monotonic() - started

    assert elapsed < PROMPT_S
    stalls.assert_cancelled_cleanly(flow)
    await stalls.resume_unblocked(flow)


@pytest.mark.anyio
async def test_a_cancelled_detached_task_is_recorded_cancelled_and_resumed() -> None:
    started = anyio.Event()
    blocking = [True]
    calls: Counter[str] = Counter()

    @task
    def main_step() -> int:
        calls["main_step"] += 1
        return 1

    @task(depends_on=[main_step], detached=True)
    async def notify(main_step: int) -> None:
        calls["notify"] += 1
        if blocking[0]:
            started.set()
            await anyio.sleep_forever()

    flow = Flow(main_step)
    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.arun)
        await started.wait()
        tg.cancel_scope.cancel()

    assert flow.results["main_step"].state is StepState.SUCCEEDED
    assert flow.results["notify"].state is StepState.CANCELLED
    blocking[0] = False
    calls.clear()
    await flow.aresume()
    assert calls == {"notify": 1}


@pytest.mark.parametrize("sync_body", [False, True], ids=["async-body", "sync-body"])
def test_a_run_deadline_cancels_unfinished_tasks_promptly_on_either_backend(
    anyio_backend: str, sync_body: bool
) -> None:
    release = threading.Event()

    @task
    def quick() -> int:
        return 1

    if sync_body:

        @task(depends_on=[quick])
        def slow(quick: int) -> int:
            release.wait(THREAD_BLOCKS_S)
            return 2

    else:

        @task(depends_on=[quick])
        async def slow(quick: int) -> int:
            await anyio.sleep(THREAD_BLOCKS_S)
            return 2

    @task(depends_on=[slow])
    def last(slow: int) -> int:
        return 3

    flow = Flow(last)
    started = time.monotonic()
    try:
        with pytest.raises(FlowTimeoutError) as caught:
            flow.run(backend=anyio_backend, timeout_s=0.2)  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert 0.2 <= elapsed < 0.2 + PROMPT_S
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.unfinished == ("slow", "last")
    assert [r.state for r in flow.results.values()] == [
        StepState.SUCCEEDED,
        StepState.CANCELLED,
        StepState.CANCELLED,
    ]


@pytest.mark.anyio
async def test_a_run_deadline_also_covers_the_detached_phase() -> None:
    @task
    def main_step() -> int:
        return 1

    @task(depends_on=[main_step], detached=True)
    async def notify(main_step: int) -> None:
        await anyio.sleep(THREAD_BLOCKS_S)

    flow = Flow(main_step)
    with pytest.raises(FlowTimeoutError) as caught:
        await flow.arun(timeout_s=0.2)

    assert caught.value.unfinished == ("notify",)
    assert flow.results["main_step"].succeeded


@pytest.mark.anyio
async def test_a_run_that_meets_its_deadline_returns_normally() -> None:
    @task
    async def fast() -> int:
        return 1

    results = await Flow(fast).arun(timeout_s=30)
    assert results["fast"].value == 1


@pytest.mark.parametrize("timeout_s", [0, -1, math.nan, True, "1"], ids=repr)
def test_a_deadline_must_be_a_positive_number(timeout_s: Any) -> None:
    @task
    def step() -> None:
        pass

    with pytest.raises(ValueError, match="timeout_s must be None or a number > 0"):
        Flow(step).run(timeout_s=timeout_s)


@pytest.mark.anyio
@pytest.mark.parametrize("journal", [False, True], ids=["no-journal", "journal"])
async def test_a_run_cancelled_before_it_starts_records_every_task_cancelled(
    journal: bool, tmp_path: Any
) -> None:
    @task
    def step() -> int:
        return 1

    flow = Flow(step, journal_path=tmp_path / "journal.jsonl" if journal else None)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await flow.arun()

    assert flow.results["step"].state is StepState.CANCELLED
