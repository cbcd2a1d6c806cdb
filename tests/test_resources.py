"""Resource hygiene: many runs leak nothing, tasks are collectable, big graphs never recurse."""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from flowing import Flow, FlowTimeoutError, StepState, TaskDef, task

_FD_DIR = "/proc/self/fd"
needs_proc = pytest.mark.skipif(not os.path.isdir(_FD_DIR), reason="needs /proc (Linux)")


@pytest.fixture
def quiet_flowing_logger() -> Iterator[None]:
    """Log records captured by pytest would look like a leak; silence the library."""
    flowing_logger = logging.getLogger("flowing")
    flowing_logger.disabled = True
    yield
    flowing_logger.disabled = False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _footprint() -> tuple[int, int, int, int]:
    gc.collect()
    return threading.active_count(), len(os.listdir(_FD_DIR)), _rss_bytes(), len(gc.get_objects())


def _join_threads_started_since(baseline: set[threading.Thread]) -> None:
    """A finished run's worker threads may take a moment to end; a leaked one never does."""
    for thread in set(threading.enumerate()) - baseline:
        thread.join(10)


def _mixed_flow() -> Flow:
    """Sync and async bodies, a retried failure, a skip and a detached task."""

    @task
    def load() -> list[int]:
        return list(range(10))

    @task(depends_on=[load])
    async def total(load: list[int]) -> int:
        await anyio.sleep(0)
        return sum(load)

    @task(depends_on=[load], retry=1, retry_backoff_base_ms=0)
    def flaky(load: list[int]) -> int:
        raise ValueError("always")

    @task(depends_on=[flaky])
    def never(flaky: int) -> int:
        return flaky

    @task(depends_on=[total], detached=True)
    def notify(total: int) -> None:
        pass

    return Flow(total, never, fail_fast=False)


@needs_proc
@pytest.mark.usefixtures("quiet_flowing_logger")
def test_a_thousand_consecutive_runs_leak_no_threads_fds_memory_or_objects() -> None:
    backends = ("asyncio", "trio")
    for i in range(50):  # warm up caches, imports and trio's thread cache
        _mixed_flow().run(backend=backends[i % 2])  # type: ignore[arg-type]
    threads, fds, rss, objects = _footprint()
    baseline = set(threading.enumerate())

    for i in range(1000):
        results = _mixed_flow().run(backend=backends[i % 2])  # type: ignore[arg-type]
        assert results["total"].value == 45
        assert results["never"].state is StepState.SKIPPED

    _join_threads_started_since(baseline)
    threads_after, fds_after, rss_after, objects_after = _footprint()
    # A leak of one item per run would show up as a thousand; allow small noise.
    assert threads_after <= threads + 2
    assert fds_after <= fds + 2
    assert rss_after - rss < 16 * 1024 * 1024
    assert objects_after - objects < 500


@pytest.mark.usefixtures("quiet_flowing_logger")
def test_threads_abandoned_by_timed_out_runs_end_once_their_bodies_return() -> None:
    release = threading.Event()
    returned = threading.Semaphore(0)
    body_threads: list[threading.Thread] = []

    @task
    def stuck() -> None:
        body_threads.append(threading.current_thread())
        release.wait(30)
        returned.release()

    threads_before = threading.active_count()
    for _ in range(20):
        with pytest.raises(FlowTimeoutError):
            Flow(stuck).run(timeout_s=0.01)
    release.set()
    for thread in body_threads:
        thread.join(30)

    assert len(body_threads) == 20
    assert all(returned.acquire(timeout=30) for _ in body_threads)
    assert not any(thread.is_alive() for thread in body_threads)
    assert threading.active_count() <= threads_before


def test_tasks_defined_in_a_loop_are_collectable() -> None:
    def define_and_run() -> list[weakref.ref[Any]]:
        @task
        def source() -> int:
            return 1

        @task(depends_on=[source])
        async def double(source: int) -> int:
            return source * 2

        @task(depends_on=[double], detached=True)
        def notify(double: int) -> None:
            pass

        flow = Flow(double)
        flow.run()
        assert flow.results["notify"].succeeded
        return [weakref.ref(obj) for obj in (source, double, notify, flow)]

    refs = [ref for _ in range(20) for ref in define_and_run()]
    gc.collect()

    assert [ref() for ref in refs if ref() is not None] == []


def _chain(length: int, fail_first: bool = False) -> TaskDef[..., Any]:
    async def step(**previous: int) -> int:
        (value,) = previous.values()
        return value + 1

    @task(name="link0")
    async def first() -> int:
        if fail_first:
            raise ValueError("the first link failed")
        return 0

    last: TaskDef[..., Any] = first
    for i in range(1, length):
        last = task(depends_on=[last], name=f"link{i}")(step)
    return last


CHAIN = 10_000
FAN_OUT = 100_000


@pytest.mark.usefixtures("quiet_flowing_logger")
@pytest.mark.parametrize(
    ("backend", "fail_first"),
    [("asyncio", False), ("trio", True)],
    ids=["asyncio-succeeds", "trio-first-link-fails"],
)
def test_a_ten_thousand_task_chain_runs_without_recursion(backend: Any, fail_first: bool) -> None:
    assert CHAIN > sys.getrecursionlimit()
    flow = Flow(_chain(CHAIN, fail_first))

    results = flow.run(backend=backend)

    assert len(results) == CHAIN
    if fail_first:
        assert results[f"link{CHAIN - 1}"].state is StepState.SKIPPED
    else:
        assert results[f"link{CHAIN - 1}"].value == CHAIN - 1
    assert len(flow.summary().splitlines()) == CHAIN + 1
    assert len(flow.step_keys()) == CHAIN


@pytest.fixture(scope="module")
def fan_out() -> tuple[Flow, list[bool]]:
    """One root feeding a hundred thousand leaves; ``fail[0]`` makes the root raise."""
    fail = [False]

    @task
    def root() -> int:
        if fail[0]:
            raise ValueError("the root failed")
        return 1

    async def leaf(root: int) -> int:
        return root

    leaves = [task(depends_on=[root], name=f"leaf{i}")(leaf) for i in range(FAN_OUT)]
    return Flow(*leaves), fail


@pytest.mark.usefixtures("quiet_flowing_logger")
def test_a_hundred_thousand_task_fan_out_runs(fan_out: tuple[Flow, list[bool]]) -> None:
    flow, fail = fan_out
    fail[0] = False

    results = flow.run()

    assert len(results) == FAN_OUT + 1
    assert all(r.value == 1 for r in results.values())


@pytest.mark.usefixtures("quiet_flowing_logger")
def test_a_hundred_thousand_task_fan_out_is_skipped_when_its_root_fails(
    fan_out: tuple[Flow, list[bool]],
) -> None:
    flow, fail = fan_out
    fail[0] = True

    results = flow.run()

    skipped = [r for r in results.values() if r.state is StepState.SKIPPED]
    assert len(skipped) == FAN_OUT
    assert {r.reason for r in skipped} == {"dependency 'root' failed"}
