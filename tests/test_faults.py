"""Faults in user code are recorded on the task and never crash or hang the run.

KeyboardInterrupt and SystemExit raised by a task are the exception: they stop
the run cleanly (every other unfinished task recorded CANCELLED) and then
propagate unchanged.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from flowing import Flow, StepState, TaskDef, TaskStarted, task

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


class BrokenStrError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


def _raise_value_error() -> Any:
    raise ValueError("bad value")


def _raise_broken_str() -> Any:
    raise BrokenStrError()


def _raise_group() -> Any:
    raise ExceptionGroup("two children failed", [ValueError("a"), KeyError("b")])


async def _raise_group_from_own_task_group() -> Any:
    async def fail(message: str) -> None:
        raise ValueError(message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(fail, "first")
        tg.start_soon(fail, "second")


def _as_task(raiser: Callable[[], Any], kind: str) -> TaskDef[[], Any]:
    if kind == "async":

        async def body() -> Any:
            result = raiser()
            return await result if inspect.isawaitable(result) else result

        return task(name="faulty")(body)
    return task(name="faulty")(raiser)


ORDINARY_FAULTS = [
    pytest.param(_raise_value_error, ValueError, kind, id=f"{kind}-ValueError")
    for kind in ("sync", "async")
] + [
    pytest.param(_raise_broken_str, BrokenStrError, kind, id=f"{kind}-exception-whose-str-raises")
    for kind in ("sync", "async")
] + [
    pytest.param(_raise_group, ExceptionGroup, kind, id=f"{kind}-exception-group")
    for kind in ("sync", "async")
] + [
    pytest.param(
        _raise_group_from_own_task_group, ExceptionGroup, "async", id="async-own-task-group"
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("raiser", "error_type", "kind"), ORDINARY_FAULTS)
async def test_an_ordinary_exception_is_recorded_and_the_rest_of_the_run_goes_on(
    raiser: Callable[[], Any], error_type: type[BaseException], kind: str
) -> None:
    faulty = _as_task(raiser, kind)

    @task(depends_on=[faulty])
    def dependent(faulty: Any) -> int:
        return 1

    @task
    def independent() -> int:
        return 2

    flow = Flow(dependent, independent, fail_fast=False)
    results = await flow.arun()

    assert results["faulty"].state is StepState.FAILED
    assert isinstance(results["faulty"].error, error_type)
    assert results["dependent"].state is StepState.SKIPPED
    assert flow.value(independent) == 2
    assert "faulty" in flow.summary()


def test_an_exception_whose_str_raises_is_still_summarised_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @task
    def faulty() -> None:
        raise BrokenStrError()

    flow = Flow(faulty)
    with caplog.at_level(logging.INFO, logger="flowing"):
        flow.run()

    assert "BrokenStrError: <exception str() failed>" in flow.summary()
    assert any("BrokenStrError" in record.getMessage() for record in caplog.records)


@pytest.mark.anyio
@pytest.mark.parametrize("gate", ["when", "validate", "retry_until"])
@pytest.mark.parametrize("raiser", [_raise_value_error, _raise_broken_str], ids=["ValueError", "broken-str"])
async def test_a_gate_that_raises_fails_its_task(gate: str, raiser: Callable[[], Any]) -> None:
    def faulty_gate(*args: Any, **kwargs: Any) -> Any:
        return raiser()

    @task(name="gated", **{gate: faulty_gate})
    def gated() -> int:
        return 1

    flow = Flow(gated)
    results = await flow.arun()

    assert results["gated"].state is StepState.FAILED
    assert results["gated"].error is not None
    assert results["gated"].reason is not None and gate in results["gated"].reason


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_task_returning_an_unawaited_coroutine_fails_with_an_error_naming_it(
    kind: str,
) -> None:
    async def fetch() -> int:
        return 1

    if kind == "sync":

        def forgot_async() -> Any:
            return fetch()

    else:

        async def forgot_async() -> Any:
            return fetch()

    flow = Flow(task(forgot_async))
    results = await flow.arun()

    error = results["forgot_async"].error
    assert results["forgot_async"].state is StepState.FAILED
    assert isinstance(error, TypeError)
    assert str(error) == (
        "task 'forgot_async' returned an un-awaited coroutine; await it in the body, "
        "which must be an 'async def' function to do so"
    )


def _stopping_task(exc_type: type[BaseException], kind: str, where: str) -> TaskDef[[], Any]:
    def raise_it(*args: Any, **kwargs: Any) -> Any:
        raise exc_type()

    if where == "gate":
        return task(name="stopper", when=raise_it)(lambda: 1)
    if kind == "async":

        async def stopper() -> None:
            raise_it()

        return task(stopper)
    return task(name="stopper")(raise_it)


@pytest.mark.parametrize("where", ["body", "gate"])
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboardinterrupt_or_systemexit_in_a_task_stops_the_run_then_propagates(
    exc_type: type[BaseException],
    kind: str,
    where: str,
    anyio_backend: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopper = _stopping_task(exc_type, kind, where)

    @task
    async def sleeper() -> None:
        await anyio.sleep_forever()

    @task(depends_on=[stopper])
    def after(stopper: Any) -> int:
        return 1

    flow = Flow(after, sleeper)
    with caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(exc_type):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]

    results = flow.results
    assert results["stopper"].state is StepState.FAILED
    assert isinstance(results["stopper"].error, exc_type)
    assert results["sleeper"].state is StepState.CANCELLED
    assert results["after"].state in (StepState.SKIPPED, StepState.CANCELLED)
    assert not caplog.records, "the event loop itself saw the exception"


def test_a_run_stopped_by_keyboardinterrupt_fires_no_detached_side_effect(anyio_backend: str) -> None:
    fired: list[str] = []

    @task
    def root() -> int:
        return 1

    @task(depends_on=[root], detached=True)
    def notify(root: int) -> None:
        fired.append("notify")

    @task(depends_on=[root])
    def stopper(root: int) -> None:
        raise KeyboardInterrupt

    flow = Flow(stopper)
    with pytest.raises(KeyboardInterrupt):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
    assert fired == []
    assert flow.results["notify"].state is StepState.CANCELLED


def test_a_run_stopped_by_keyboardinterrupt_resumes_where_it_stopped() -> None:
    calls: list[str] = []
    interrupt = [True]

    @task
    def first() -> int:
        calls.append("first")
        return 1

    @task(depends_on=[first])
    def second(first: int) -> int:
        calls.append("second")
        if interrupt[0]:
            raise KeyboardInterrupt
        return first + 1

    flow = Flow(second)
    with pytest.raises(KeyboardInterrupt):
        flow.run()
    interrupt[0] = False
    flow.resume()

    assert calls == ["first", "second", "second"]
    assert flow.value(second) == 2


def _callback(raiser: Callable[[], Any], kind: str) -> Callable[[Any], Any]:
    if kind == "async":

        async def on_event(event: Any) -> None:
            raiser()

        return on_event

    def sync_on_event(event: Any) -> None:
        raiser()

    return sync_on_event


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "raiser", [_raise_value_error, _raise_broken_str, _raise_group], ids=["ValueError", "broken-str", "group"]
)
async def test_an_event_callback_that_raises_does_not_disturb_the_run(
    raiser: Callable[[], Any], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    @task
    def first() -> int:
        return 1

    @task(depends_on=[first])
    async def second(first: int) -> int:
        return first + 1

    flow = Flow(second, on_event=_callback(raiser, kind))
    with caplog.at_level(logging.ERROR, logger="flowing"):
        await flow.arun()

    assert flow.value(second) == 2
    logged = [r for r in caplog.records if "on_event callback" in r.getMessage()]
    assert len(logged) == 1  # the first failure with its traceback, later ones at DEBUG
    assert logged[0].exc_info is not None
    assert caplog.text  # formatting the traceback did not fail


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboardinterrupt_or_systemexit_in_an_event_callback_stops_the_run_then_propagates(
    exc_type: type[BaseException], kind: str, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    def raise_on_task_start(event: Any) -> None:
        if isinstance(event, TaskStarted) and event.task == "first":
            raise exc_type()

    @task
    def first() -> int:
        return 1

    @task
    async def sleeper() -> None:
        await anyio.sleep_forever()

    if kind == "async":

        async def on_event(event: Any) -> None:
            raise_on_task_start(event)

    else:
        on_event = raise_on_task_start

    flow = Flow(first, sleeper, on_event=on_event)
    with caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(exc_type):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]

    assert flow.results["sleeper"].state is StepState.CANCELLED
    assert not caplog.records, "the event loop itself saw the exception"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_body_raising_a_cancellation_of_its_own_fails_only_its_task(
    kind: str, anyio_backend: str
) -> None:
    import asyncio

    def raise_cancelled() -> None:
        raise asyncio.CancelledError("raised by the body itself")

    if kind == "async":

        async def sneaky() -> None:
            raise_cancelled()

    else:

        def sneaky() -> None:
            raise_cancelled()

    @task
    async def independent() -> int:
        await anyio.sleep(0.01)
        return 1

    flow = Flow(task(sneaky), independent, fail_fast=False)
    results = flow.run(backend=anyio_backend)  # type: ignore[arg-type]

    assert results["sneaky"].state is StepState.FAILED
    assert isinstance(results["sneaky"].error, asyncio.CancelledError)
    assert results["independent"].value == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_keyboardinterrupt_in_a_mapped_instance_stops_the_run_then_propagates(
    kind: str, anyio_backend: str
) -> None:
    @task
    def items() -> list[int]:
        return [1, 2, 3]

    if kind == "async":

        async def each(items: int) -> int:
            if items == 2:
                raise KeyboardInterrupt
            await anyio.sleep(0)
            return items

    else:

        def each(items: int) -> int:
            if items == 2:
                raise KeyboardInterrupt
            return items

    @task
    async def sleeper() -> None:
        await anyio.sleep_forever()

    flow = Flow(task(depends_on=[items], map_over="items")(each), sleeper)
    with pytest.raises(KeyboardInterrupt):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]

    assert flow.results["each"].state is StepState.FAILED
    assert flow.results["sleeper"].state is StepState.CANCELLED
