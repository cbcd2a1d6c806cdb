"""The executor seam: where sync bodies run, and which bodies never leave the loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from flowing import (
    BodyRunner,
    Flow,
    FlowDefinitionError,
    RunThreads,
    StepState,
    ThreadExecutor,
    task,
)
from flowing._threads import ThreadSlots

pytestmark = pytest.mark.anyio


class RecordingExecutor:
    """Runs bodies in-process like the default, remembering which ones it was given."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.sessions_open = 0
        self.sessions_opened = 0

    @asynccontextmanager
    async def session(self, threads: ThreadSlots) -> AsyncIterator[BodyRunner]:
        self.sessions_open += 1
        self.sessions_opened += 1
        try:
            yield self._Runner(self)
        finally:
            self.sessions_open -= 1

    class _Runner:
        def __init__(self, owner: RecordingExecutor) -> None:
            self.owner = owner

        async def run(
            self, task: Any, kwargs: dict[str, Any], on_abandon: Callable[[], None]
        ) -> Any:
            self.owner.ran.append(task.name)
            return task.fn(**kwargs)


def mixed_graph() -> Any:
    @task
    def source() -> int:
        return 2

    @task(depends_on=[source])
    async def doubled(source: int) -> int:
        return source * 2

    @task(depends_on=[source], local=True)
    def local_square(source: int) -> int:
        return source**2

    @task(depends_on=[doubled, local_square])
    def total(doubled: int, local_square: int) -> int:
        return doubled + local_square

    return total


async def test_only_sync_bodies_not_marked_local_go_through_the_executor() -> None:
    executor = RecordingExecutor()
    flow = Flow(mixed_graph(), executor=executor)
    results = await flow.arun()
    assert results["total"].value == 8
    assert sorted(executor.ran) == ["source", "total"]


async def test_a_session_is_opened_once_per_run_and_closed_after_it() -> None:
    executor = RecordingExecutor()
    flow = Flow(mixed_graph(), executor=executor)
    await flow.arun()
    await flow.arun()
    assert (executor.sessions_opened, executor.sessions_open) == (2, 0)


@pytest.mark.parametrize("executor", [None, ThreadExecutor()], ids=["default", "explicit"])
async def test_the_thread_executor_gives_the_same_results_as_the_default(
    executor: ThreadExecutor | None,
) -> None:
    results = await Flow(mixed_graph(), executor=executor).arun()
    assert {n: (r.state, r.value) for n, r in results.items()} == {
        "source": (StepState.SUCCEEDED, 2),
        "doubled": (StepState.SUCCEEDED, 4),
        "local_square": (StepState.SUCCEEDED, 4),
        "total": (StepState.SUCCEEDED, 8),
    }


@pytest.mark.parametrize("executor", [None, ThreadExecutor()], ids=["default", "explicit"])
async def test_a_sync_body_returning_a_coroutine_fails_clearly(
    executor: ThreadExecutor | None,
) -> None:
    async def forgot_to_await() -> int:
        return 1

    @task
    def mistaken() -> Any:
        return forgot_to_await()

    results = await Flow(mistaken, executor=executor).arun()
    assert results["mistaken"].state is StepState.FAILED
    assert "task 'mistaken' returned an un-awaited coroutine" in str(results["mistaken"].error)


class MappingHaltsExecutor:
    """Runs bodies in-process; records each mapping halt its runner is told of."""

    def __init__(self) -> None:
        self.halts: list[tuple[str, str]] = []

    @asynccontextmanager
    async def session(self, threads: RunThreads) -> AsyncIterator[BodyRunner]:
        async def record(step: str, reason: str) -> None:
            self.halts.append((step, reason))

        threads.on_mapping_halt(record)
        yield RecordingExecutor._Runner(RecordingExecutor())


@pytest.mark.parametrize(
    ("fail_fast", "detached", "halts"),
    [
        (True, False, [("each", "fail_fast stopped the mapping after 'each[1]' failed")]),
        (False, False, []),
        (True, True, []),
    ],
    ids=["fail_fast", "no fail_fast", "detached"],
)
async def test_a_runner_is_told_once_when_fail_fast_stops_a_mapping(
    fail_fast: bool, detached: bool, halts: list[tuple[str, str]]
) -> None:
    @task
    def items() -> list[int]:
        return [0, 1, 2, 3]

    @task(depends_on=[items], map_over="items", detached=detached)
    def each(items: int) -> int:
        if items % 2:
            raise ValueError(items)
        return items

    executor = MappingHaltsExecutor()
    await Flow(each, items, fail_fast=fail_fast, executor=executor, max_workers=1).arun()
    assert executor.halts == halts


@pytest.mark.parametrize(
    "bad", [42, "tcp://127.0.0.1:8786", object(), dict], ids=["int", "address", "object", "class"]
)
def test_a_flow_refuses_an_executor_that_is_not_one(bad: object) -> None:
    with pytest.raises(FlowDefinitionError, match="executor must be an Executor"):
        Flow(mixed_graph(), executor=bad)  # type: ignore[arg-type]


class InThreadsNamespace:
    """An executor made of a static method: the class itself is the executor."""

    @staticmethod
    def session(threads: RunThreads) -> Any:
        return ThreadExecutor().session(threads)


def test_an_executor_class_whose_session_is_static_is_the_executor_itself() -> None:
    flow = Flow(mixed_graph(), executor=InThreadsNamespace)  # type: ignore[arg-type]
    assert flow.executor is InThreadsNamespace
    assert all(r.state is StepState.SUCCEEDED for r in flow.run().values())


def test_an_executor_class_instead_of_an_instance_is_refused_with_the_call_to_write() -> None:
    with pytest.raises(FlowDefinitionError) as caught:
        Flow(mixed_graph(), executor=ThreadExecutor)  # type: ignore[arg-type]
    assert str(caught.value) == (
        "executor is the class ThreadExecutor; pass an instance: executor=ThreadExecutor(...)"
    )


def test_local_defaults_to_false_and_is_kept() -> None:
    @task
    def anywhere() -> None: ...

    @task(local=True)
    def here() -> None: ...

    assert (anywhere.local, here.local) == (False, True)
