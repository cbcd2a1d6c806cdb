"""The scheduler's runner group: every runner ends before the block is left."""

from __future__ import annotations

import sys
import types

import anyio
import anyio.lowlevel
import pytest

from flowing import _runners
from flowing._runners import open_runners

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

find_task_states = _runners._AnyioTaskStates.find  # as anyio is, whatever a test patches


@pytest.fixture(autouse=True, params=["anyio's task states", "an anyio task group"])
def asyncio_runners(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """On asyncio, every test runs with runners anyio counts through its private task
    states, and again with the task group used where an anyio release lacks them."""
    if request.param == "an anyio task group":
        monkeypatch.setattr(_runners._AnyioTaskStates, "find", classmethod(lambda cls: None))
    return str(request.param)


class _TaskStateOfAnotherShape:
    def __init__(self, cancel_scope: object) -> None:
        self.cancel_scope = cancel_scope


def test_an_anyio_release_whose_task_state_takes_other_arguments_is_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import anyio._backends._asyncio as backend

    monkeypatch.setattr(backend, "TaskState", _TaskStateOfAnotherShape)
    assert find_task_states() is None


@pytest.mark.parametrize(
    "missing",
    ["_task_states", "TaskState", "CancelScope"],
    ids=["no task states", "no TaskState class", "no scope class"],
)
def test_an_anyio_release_without_task_states_is_detected(
    missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio._backends._asyncio as backend

    assert find_task_states() is not None
    stripped = types.SimpleNamespace(**{k: v for k, v in vars(backend).items() if k != missing})
    monkeypatch.setitem(sys.modules, "anyio._backends._asyncio", stripped)
    assert find_task_states() is None


def test_task_states_kept_otherwise_than_in_a_weak_key_dictionary_are_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import anyio._backends._asyncio as backend

    monkeypatch.setattr(backend, "_task_states", {})
    assert find_task_states() is None


async def test_leaving_the_block_waits_for_every_runner_including_those_started_by_runners() -> None:
    finished: list[int] = []

    async with open_runners() as runners:

        async def runner(i: int) -> None:
            await anyio.sleep(0)
            if i < 3:
                runners.start_soon(runner, i + 10, f"child-{i}")
            finished.append(i)

        for i in range(3):
            runners.start_soon(runner, i, f"runner-{i}")

    assert sorted(finished) == [0, 1, 2, 10, 11, 12]


async def test_cancel_stops_waiting_runners_and_those_not_yet_begun() -> None:
    began: list[int] = []
    cancelled: list[int] = []

    async def runner(i: int) -> None:
        began.append(i)
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(i)
            raise

    async with open_runners() as runners:
        runners.start_soon(runner, 1, "first")
        await anyio.sleep(0)
        await anyio.sleep(0)
        runners.start_soon(runner, 2, "second")
        runners.cancel()

    assert sorted(began) == sorted(cancelled)
    assert 1 in began


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_a_runner_not_yet_begun_when_cancel_is_called_never_begins(
    asyncio_runners: str,
) -> None:
    if asyncio_runners == "an anyio task group":
        pytest.skip("anyio begins every task of a cancelled task group: no claim to test")
    began: list[int] = []

    async def runner(i: int) -> None:
        began.append(i)

    async with open_runners() as runners:
        runners.start_soon(runner, 1, "not yet begun")
        runners.cancel()
        runners.start_soon(runner, 2, "started after cancel")

    assert began == []


async def test_a_cancelled_runner_sees_an_effective_deadline_of_minus_infinity() -> None:
    seen: list[float] = []

    async def runner(i: int) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            seen.append(anyio.current_effective_deadline())
            raise

    async with open_runners() as runners:
        runners.start_soon(runner, 0, "r")
        await anyio.sleep(0)
        runners.cancel()

    assert seen == [float("-inf")]


async def test_a_shield_inside_a_runner_holds_against_cancel() -> None:
    shielded = anyio.Event()
    completed: list[str] = []

    async def runner(i: int) -> None:
        with anyio.CancelScope(shield=True):
            shielded.set()
            for _ in range(3):
                await anyio.sleep(0)
            completed.append("shielded work")

    async with open_runners() as runners:
        runners.start_soon(runner, 0, "r")
        await shielded.wait()
        runners.cancel()

    assert completed == ["shielded work"]


async def test_cancelling_the_block_from_outside_cancels_the_runners_and_waits_for_them() -> None:
    unwound: list[int] = []

    async def runner(i: int) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0)
            unwound.append(i)

    with anyio.CancelScope() as outer:
        async with open_runners() as runners:
            for i in range(3):
                runners.start_soon(runner, i, f"r{i}")
            await anyio.sleep(0)
            outer.cancel()

    assert outer.cancelled_caught
    assert sorted(unwound) == [0, 1, 2]


async def test_cancel_reaches_the_tasks_of_a_task_group_inside_a_runner() -> None:
    cancelled: list[str] = []
    both_waiting = anyio.Event()

    async def wait_forever(who: str) -> None:
        try:
            if who == "child":
                both_waiting.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(who)
            raise

    async def runner(i: int) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_forever, "child")
            await wait_forever("runner")

    with anyio.fail_after(5):
        async with open_runners() as runners:
            runners.start_soon(runner, 0, "r")
            await both_waiting.wait()
            runners.cancel()

    assert sorted(cancelled) == ["child", "runner"]


async def test_an_exception_a_runner_lets_out_is_raised_from_the_block() -> None:
    async def broken(i: int) -> None:
        raise LookupError(f"bug in runner {i}")

    async def waiting(i: int) -> None:
        await anyio.sleep_forever()

    with pytest.raises(Exception) as raised:  # trio's task group wraps it in a group
        async with open_runners() as runners:
            runners.start_soon(waiting, 0, "waiting")
            runners.start_soon(broken, 1, "broken")

    assert "bug in runner 1" in repr(raised.value)


async def test_an_exception_a_runner_lets_out_and_the_blocks_own_are_both_raised() -> None:
    failing = anyio.Event()

    async def broken(i: int) -> None:
        failing.set()
        raise LookupError("bug in a runner")

    with pytest.raises(BaseExceptionGroup) as raised:
        async with open_runners() as runners:
            runners.start_soon(broken, 1, "broken")
            with anyio.CancelScope(shield=True):  # the block goes on after the runner failed
                await failing.wait()
                await anyio.lowlevel.checkpoint()
            raise ValueError("bug in the block")

    assert sorted(type(e).__name__ for e in raised.value.exceptions) == ["LookupError", "ValueError"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_cancelling_the_block_twice_still_waits_for_every_runner() -> None:
    import asyncio

    started, shielded, release = anyio.Event(), anyio.Event(), anyio.Event()
    unwound: list[int] = []

    async def runner(i: int) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):  # cleanup a body may shield
                shielded.set()
                await release.wait()
            unwound.append(i)

    async def host() -> None:
        async with open_runners() as runners:
            runners.start_soon(runner, 0, "r")

    hosting = asyncio.create_task(host())
    await started.wait()
    hosting.cancel()
    await shielded.wait()
    hosting.cancel()  # asyncio's own cancellation, which no anyio shield stops
    for _ in range(5):
        await asyncio.sleep(0)
    assert not hosting.done(), "the block was left while a runner still ran"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await hosting
    assert unwound == [0]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in 3.12")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_a_runner_that_an_eager_task_factory_ran_to_the_end_is_not_awaited() -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    finished: list[int] = []

    async def runner(i: int) -> None:  # never suspends: done inside create_task
        finished.append(i)

    try:
        with anyio.fail_after(5):
            async with open_runners() as runners:
                runners.start_soon(runner, 0, "eager")
    finally:
        loop.set_task_factory(None)
    assert finished == [0]


async def test_a_cancel_scope_around_the_block_cancelled_while_runners_wait_cancels_the_block() -> None:
    waiting = anyio.Event()
    left_normally: list[str] = []

    async def runner(i: int) -> None:
        waiting.set()
        await anyio.sleep_forever()

    with anyio.fail_after(5):
        with anyio.CancelScope() as outer:
            async with open_runners() as runners:
                runners.start_soon(runner, 0, "r")
                await waiting.wait()
                outer.cancel()  # by the block's own task: anyio skips it until its next wait
            left_normally.append("the block was left without the cancellation")

    assert left_normally == []
    assert outer.cancelled_caught


async def test_an_exception_a_runner_lets_out_is_raised_even_when_the_block_is_cancelled_meanwhile() -> None:
    async def broken(i: int) -> None:
        raise LookupError(f"bug in runner {i}")

    with anyio.fail_after(5), pytest.raises(Exception) as raised:
        with anyio.CancelScope() as outer:
            async with open_runners() as runners:
                runners.start_soon(broken, 1, "broken")
                outer.cancel()

    assert "bug in runner 1" in repr(raised.value)
