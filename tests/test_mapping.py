"""Dynamic fan-out: a mapped task runs once per element, and its step holds the values in order."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from flowing import (
    Event,
    Flow,
    InstanceFinished,
    InvalidTaskError,
    MapOverError,
    StepState,
    TaskFinished,
    TaskRetrying,
    TaskStarted,
    task,
)

from _tracker import Rendezvous, Tracker

from flowing._mapping import instance_keys
from flowing._runners import BEGIN_AHEAD

WAIT_S = 10  # a generous bound: only reached when something is broken


def _source(value: Any, name: str = "items") -> Any:
    return task(name=name)(lambda: value)


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_results_keep_element_order_when_instances_finish_in_reverse(is_async: bool) -> None:
    count = 4
    items = _source(list(range(count)))
    # Instance k may finish only after instance k + 1 has: the last one finishes first.
    done = [threading.Event() for _ in range(count + 1)]
    async_done = [anyio.Event() for _ in range(count + 1)]
    done[count].set()
    async_done[count].set()
    finished: list[int] = []

    if is_async:

        @task(depends_on=[items], map_over="items")
        async def square(items: int) -> int:
            with anyio.fail_after(WAIT_S):
                await async_done[items + 1].wait()
            finished.append(items)
            async_done[items].set()
            return items * items

    else:

        @task(depends_on=[items], map_over="items")
        def square(items: int) -> int:
            assert done[items + 1].wait(WAIT_S)
            finished.append(items)
            done[items].set()
            return items * items

    @task(depends_on=[square])
    def collect(square: list[int]) -> list[int]:
        return square

    results = await Flow(collect, max_workers=count).arun()
    assert finished == [3, 2, 1, 0]
    assert results["collect"].value == [0, 1, 4, 9]
    assert results["square"].reason == "mapped over 4 element(s)"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "value",
    [[], (), range(0), {}, iter([])],
    ids=["list", "tuple", "range", "dict", "iterator"],
)
async def test_an_empty_input_gives_an_empty_list_and_downstream_runs(value: Any) -> None:
    items = _source(value)

    @task(depends_on=[items], map_over=items)
    def double(items: int) -> int:
        return 2 * items

    @task(depends_on=[double])
    def count(double: list[int]) -> int:
        return len(double)

    results = await Flow(count).arun()
    assert (results["double"].value, results["count"].value) == ([], 0)


@pytest.mark.anyio
async def test_other_dependencies_arrive_whole_in_every_instance() -> None:
    items = _source(["a", "b"])
    prefix = _source(">", "prefix")

    @task(depends_on=[items, prefix], map_over="items")
    def label(items: str, prefix: str) -> str:
        return prefix + items

    results = await Flow(label).arun()
    assert results["label"].value == [">a", ">b"]


@pytest.mark.anyio
async def test_each_instance_retries_on_its_own_and_emits_its_own_events() -> None:
    items = _source(["x", "y", "z"])
    failures = {"y": 2}

    @task(depends_on=[items], map_over="items", retry=2, retry_backoff_base_ms=0)
    def fetch(items: str) -> str:
        if failures.get(items, 0):
            failures[items] -= 1
            raise ConnectionError(items)
        return items.upper()

    events: list[Event] = []
    results = await Flow(fetch, on_event=events.append).arun()
    assert results["fetch"].value == ["X", "Y", "Z"]
    assert results["fetch"].attempts == 3  # the most any instance took
    retried = [e.task for e in events if isinstance(e, TaskRetrying)]
    assert retried == ["fetch[1]", "fetch[1]"]
    started = [e for e in events if isinstance(e, TaskStarted) and e.task != "items"]
    assert (started[0].task, started[0].attempt, started[0].max_attempts) == ("fetch", 1, 1)
    assert sorted(e.task for e in started[1:]) == ["fetch[0]", "fetch[1]", "fetch[1]", "fetch[1]", "fetch[2]"]
    instances = sorted(
        (e.item, e.task, e.result.state, e.result.attempts)
        for e in events
        if isinstance(e, InstanceFinished)
    )
    assert instances == [
        (0, "fetch[0]", StepState.SUCCEEDED, 1),
        (1, "fetch[1]", StepState.SUCCEEDED, 3),
        (2, "fetch[2]", StepState.SUCCEEDED, 1),
    ]
    finished = [e.task for e in events if isinstance(e, TaskFinished)]
    assert finished == ["items", "fetch"]


@pytest.mark.anyio
async def test_each_instance_has_its_own_timeout() -> None:
    items = _source([0, 1, 2])

    @task(depends_on=[items], map_over="items", timeout_s=0.2)
    async def wait(items: int) -> int:
        if items == 1:
            await anyio.sleep_forever()
        return items

    results = await Flow(wait, fail_fast=False).arun()
    step = results["wait"]
    assert step.state is StepState.FAILED
    assert isinstance(step.error, TimeoutError)
    assert "task 'wait[1]' timed out after 0.2 s" in str(step.error)


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_failed_instance_fails_the_step_and_without_fail_fast_the_others_finish(
    is_async: bool,
) -> None:
    items = _source(list(range(5)))
    calls: list[int] = []

    def body(items: int) -> int:
        calls.append(items)
        if items == 2:
            raise ValueError(f"element {items} is bad")
        return items

    async def async_body(items: int) -> int:
        return body(items)

    mapped = task(depends_on=[items], map_over="items", name="check")(
        async_body if is_async else body
    )

    @task(depends_on=[mapped])
    def after(check: list[int]) -> int:
        return len(check)

    events: list[Event] = []
    results = await Flow(after, fail_fast=False, on_event=events.append).arun()
    step = results["check"]
    assert step.state is StepState.FAILED
    assert isinstance(step.error, ValueError) and str(step.error) == "element 2 is bad"
    assert step.reason == "1 of 5 instance(s) failed, first 'check[2]'"
    assert sorted(calls) == [0, 1, 2, 3, 4]
    states = {e.item: e.result.state for e in events if isinstance(e, InstanceFinished)}
    assert states == {k: StepState.FAILED if k == 2 else StepState.SUCCEEDED for k in range(5)}
    assert results["after"].state is StepState.SKIPPED
    assert results["after"].reason == "dependency 'check' failed"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "task_options,flow_options",
    [({"max_concurrency": 1}, {}), ({}, {"max_workers": 1}), ({"timeout_s": 30}, {"max_workers": 1})],
    ids=["one-by-one", "in-batches", "waiting-for-a-thread"],
)
async def test_under_fail_fast_no_instance_starts_after_one_failed(
    task_options: dict[str, Any], flow_options: dict[str, Any]
) -> None:
    items = _source(list(range(6)))
    calls: list[int] = []

    @task(depends_on=[items], map_over="items", **task_options)
    def check(items: int) -> int:
        calls.append(items)
        if items == 1:
            raise ValueError("bad")
        return items

    events: list[Event] = []
    results = await Flow(check, on_event=events.append, **flow_options).arun()
    assert calls == [0, 1]
    assert results["check"].state is StepState.FAILED
    assert isinstance(results["check"].error, ValueError)
    skipped = [e for e in events if isinstance(e, InstanceFinished) and e.item >= 2]
    assert [e.result.state for e in skipped] == [StepState.SKIPPED] * 4
    assert skipped[0].result.reason == (
        "not started: fail_fast stopped the mapping after 'check[1]' failed"
    )


@pytest.mark.anyio
async def test_a_skipped_instance_skips_the_step_and_its_dependents() -> None:
    items = _source([1, -1, 2])

    @task(depends_on=[items], map_over="items", when=lambda items: items > 0)
    def root(items: int) -> float:
        return float(items) ** 0.5

    @task(depends_on=[root])
    def after(root: list[float]) -> int:
        return len(root)

    results = await Flow(after).arun()
    assert results["root"].state is StepState.SKIPPED
    assert results["root"].reason == (
        "1 of 3 instance(s) did not succeed, first 'root[1]': when= returned a falsy value"
    )
    assert results["after"].state is StepState.SKIPPED


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_max_concurrency_bounds_how_many_instances_run_at_once(is_async: bool) -> None:
    tracker = Tracker(limit=2)
    items = _source(list(range(6)))
    released = anyio.Event()

    def sync_body(items: int) -> int:
        tracker.enter()
        try:
            tracker.release.wait(WAIT_S)
        finally:
            tracker.leave()
        return items

    async def async_body(items: int) -> int:
        tracker.enter()
        try:
            with anyio.move_on_after(WAIT_S):
                await released.wait()
        finally:
            tracker.leave()
        return items

    mapped = task(depends_on=[items], map_over="items", max_concurrency=2, name="call")(
        async_body if is_async else sync_body
    )

    @task
    async def controller() -> bool:
        filled = await anyio.to_thread.run_sync(tracker.full.wait, WAIT_S)
        tracker.release.set()
        released.set()
        return filled

    results = await Flow(mapped, controller, max_workers=8).arun()
    assert results["call"].value == list(range(6))
    assert results["controller"].value is True  # two instances did run at once ...
    assert tracker.peak == 2  # ... and never more


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (42, "task 'use' maps over 'items', whose value 42 (int) cannot be mapped: it is "
         "not iterable; return a list (or any iterable) from 'items'"),
        (None, "whose value None (NoneType) cannot be mapped: it is not iterable"),
        ("abc", "mapping over a str would run once per character"),
        (b"abc", "mapping over a bytes would run once per character"),
    ],
    ids=["int", "None", "str", "bytes"],
)
async def test_a_value_that_cannot_be_mapped_fails_the_step_with_a_clear_error(
    value: Any, message: str
) -> None:
    items = _source(value)

    @task(depends_on=[items], map_over="items")
    def use(items: Any) -> Any:
        return items

    results = await Flow(use).arun()
    step = results["use"]
    assert step.state is StepState.FAILED
    assert isinstance(step.error, MapOverError) and isinstance(step.error, TypeError)
    assert message in str(step.error)
    assert step.reason == "cannot map over 'items'"


@pytest.mark.anyio
async def test_a_second_mapping_over_one_iterator_fails_naming_the_step_that_consumed_it() -> None:
    items = _source(iter([1, 2]))

    @task(depends_on=[items], map_over="items")
    def first(items: int) -> int:
        return items

    @task(depends_on=[first, items], map_over="items")
    def second(first: list[int], items: int) -> int:
        return items

    results = await Flow(second, fail_fast=False).arun()
    assert results["first"].value == [1, 2]
    assert results["second"].state is StepState.FAILED
    assert "it is an iterator that 'first' already consumed" in str(results["second"].error)


@pytest.mark.anyio
async def test_resume_maps_again_over_the_elements_a_generator_gave_the_run_before() -> None:
    items = _source(x for x in [1, 2, 3])
    broken = {2}
    calls: list[int] = []

    @task(depends_on=[items], map_over="items")
    def use(items: int) -> int:
        calls.append(items)
        if items in broken:
            raise ValueError("not yet")
        return items

    flow = Flow(use, fail_fast=False)
    await flow.arun()
    broken.clear()
    results = await flow.aresume()
    assert results["use"].value == [1, 2, 3]
    assert sorted(calls) == [1, 2, 2, 3]  # only the failed one again


@pytest.mark.anyio
async def test_an_iterator_consumed_in_the_run_before_fails_a_resumed_mapping_naming_the_consumer() -> None:
    items = _source(iter([1, 2, 3]))

    @task(depends_on=[items], map_over="items")
    def first(items: int) -> int:
        return items

    @task(depends_on=[items], map_over="items")
    def second(items: int) -> int:
        return items

    flow = Flow(first, second, fail_fast=False)
    await flow.arun()  # one of them consumed it, the other failed
    results = await flow.aresume()
    failed = [r for r in results.values() if r.state is StepState.FAILED]
    assert len(failed) == 1
    assert "it is an iterator that" in str(failed[0].error) and "already consumed" in str(failed[0].error)


@pytest.mark.anyio
async def test_a_generator_another_task_iterated_fails_the_mapping_over_it() -> None:
    items = _source(x for x in [1, 2, 3])

    @task(depends_on=[items])
    def total(items: Iterator[int]) -> int:
        return sum(items)

    @task(depends_on=[items, total], map_over="items")
    def each(items: int, total: int) -> int:
        return items

    results = await Flow(each, fail_fast=False).arun()
    assert results["total"].value == 6
    assert "it is a generator that was already iterated" in str(results["each"].error)


@pytest.mark.anyio
async def test_an_iterable_that_raises_while_listed_fails_the_step_with_its_error() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    items = _source(broken())

    @task(depends_on=[items], map_over="items")
    def use(items: int) -> int:
        return items

    step = (await Flow(use).arun())["use"]
    assert step.state is StepState.FAILED
    assert isinstance(step.error, OSError) and str(step.error) == "disk gone"


def test_map_over_must_name_a_dependency() -> None:
    items = _source([1])
    other = _source([2], "other")

    def use(items: int) -> int:
        return items

    with pytest.raises(InvalidTaskError) as info:
        task(depends_on=[items], map_over="itmes")(use)
    assert str(info.value) == (
        "map_over='itmes' of task 'use' is not one of its dependencies "
        "(depends_on: 'items'); add that task to depends_on"
    )
    with pytest.raises(InvalidTaskError, match="is task 'other', which is not in its depends_on"):
        task(depends_on=[items], map_over=other)(use)
    with pytest.raises(InvalidTaskError, match="must name one of its dependencies, got 3"):
        task(depends_on=[items], map_over=3)(use)  # type: ignore[arg-type]


def test_a_failed_instance_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    items = _source([0, 1])

    @task(depends_on=[items], map_over="items")
    def use(items: int) -> int:
        if items:
            raise ValueError("nope")
        return items

    with caplog.at_level(logging.DEBUG, logger="flowing"):
        Flow(use, fail_fast=False).run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("instance")]
    assert sorted(lines) == [
        "instance 'use[0]' succeeded after 1 attempt(s)",
        "instance 'use[1]' failed after 1 attempt(s): ValueError: nope",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True], ids=["sync-with-retries", "async"])
async def test_an_instance_raising_its_own_cancellation_fails_and_does_not_vanish(
    is_async: bool,
) -> None:
    """asyncio.CancelledError from a body is no cancellation of the run: the instance
    fails with it, as a declared task would (it used to drop out of the step's value)."""
    items = _source([0, 1, 2])

    def body(items: int) -> int:
        if items == 1:
            raise asyncio.CancelledError("nobody asked")
        return items

    async def async_body(items: int) -> int:
        return body(items)

    mapped = task(depends_on=[items], map_over="items", name="odd", retry=0 if is_async else 1)(
        async_body if is_async else body
    )
    events: list[Event] = []
    results = await Flow(mapped, fail_fast=False, on_event=events.append).arun()
    assert results["odd"].state is StepState.FAILED
    assert isinstance(results["odd"].error, asyncio.CancelledError)
    assert results["odd"].reason == (
        "1 of 3 instance(s) failed, first 'odd[1]': raised a cancellation nothing had asked for"
    )
    assert sorted(e.item for e in events if isinstance(e, InstanceFinished)) == [0, 1, 2]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboardinterrupt_in_an_instance_stops_the_run_then_propagates(
    exc_type: type[BaseException], anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    items = _source([0, 1, 2])

    @task(depends_on=[items], map_over="items")
    async def use(items: int) -> int:
        if items == 1:
            raise exc_type
        await anyio.sleep_forever()
        return items

    flow = Flow(use)
    with caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(exc_type):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
    assert flow.results["use"].state is StepState.FAILED
    assert isinstance(flow.results["use"].error, exc_type)
    assert not caplog.records


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboardinterrupt_from_on_event_during_instances_propagates_bare_on_every_backend(
    exc_type: type[BaseException], anyio_backend: str
) -> None:
    items = _source([0, 1, 2])

    @task(depends_on=[items], map_over="items")
    async def use(items: int) -> int:
        if items != 1:
            await anyio.sleep_forever()
        return items

    def on_event(event: Event) -> None:
        if isinstance(event, InstanceFinished) and event.item == 1:
            raise exc_type

    flow = Flow(use, on_event=on_event)
    with pytest.raises(exc_type):
        flow.run(backend=anyio_backend)  # type: ignore[arg-type]
    assert isinstance(flow.results["use"].error, exc_type)


def test_the_plain_progress_display_shows_instances_and_counts_them_with_their_step() -> None:
    from flowing._progress import PlainDisplay

    items = _source([1, 2])

    @task(depends_on=[items], map_over="items")
    def square(items: int) -> int:
        return items * items

    out = io.StringIO()
    display = PlainDisplay(out)
    display.start()
    Flow(square, on_event=display.on_event).run()
    display.stop()
    assert display.finished == 2  # items and square: instances count with their step
    assert "ok         square[1]" in out.getvalue()



class _Opaque:
    """An element without a stable encoding."""


def test_an_instance_keeps_its_journal_key_whatever_the_order_of_the_elements() -> None:
    assert instance_keys("step", ["a", "b"], True) == instance_keys("step", ["b", "a"], True)[::-1]


def test_equal_elements_get_journal_keys_of_their_own() -> None:
    keys = instance_keys("step", ["a", "a"], True)
    assert None not in keys and keys[0] != keys[1]


@pytest.mark.parametrize("ordered", [True, False], ids=["sequence", "set-or-iterator"])
def test_an_element_without_a_stable_encoding_is_keyed_by_its_position_in_a_sequence_only(
    ordered: bool,
) -> None:
    keys = instance_keys("step", [_Opaque(), _Opaque()], ordered)
    if ordered:
        assert None not in keys and keys[0] != keys[1]
    else:
        assert keys == [None, None]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "task_options", [{}, {"timeout_s": 30}, {"is_async": True}], ids=["in-batches", "one-by-one", "async"]
)
async def test_resume_runs_again_only_the_instances_that_did_not_succeed(
    task_options: dict[str, Any],
) -> None:
    items = _source([0, 1, 2, 3])
    calls: list[int] = []
    broken = {1, 3}
    is_async = task_options.pop("is_async", False)

    def body(items: int) -> int:
        calls.append(items)
        if items in broken:
            raise ValueError(items)
        return items * 10

    async def async_body(items: int) -> int:
        return body(items)

    fn = async_body if is_async else body
    mapped = task(fn, name="mapped", depends_on=[items], map_over="items", **task_options)
    flow = Flow(mapped, fail_fast=False)
    assert (await flow.arun())["mapped"].state is StepState.FAILED
    broken.clear()
    calls.clear()
    async with anyio.create_task_group() as tg:
        stream = flow.events()
        tg.start_soon(flow.aresume)
        events = [e async for e in stream]
    assert flow.value(mapped) == [0, 10, 20, 30]
    assert sorted(calls) == [1, 3]
    finished = sorted(e.item for e in events if isinstance(e, InstanceFinished))
    assert finished == [0, 1, 2, 3]  # the kept ones are reported again


@pytest.mark.anyio
async def test_a_new_run_runs_every_instance_again() -> None:
    items = _source([0, 1])
    calls: list[int] = []

    @task(depends_on=[items], map_over="items")
    def mapped(items: int) -> int:
        calls.append(items)
        return items

    flow = Flow(mapped)
    await flow.arun()
    await flow.arun()
    assert sorted(calls) == [0, 0, 1, 1]


@pytest.mark.anyio
async def test_resume_after_an_override_maps_over_the_overridden_value() -> None:
    """Even when the override is the same list, changed in place."""
    items = _source([1, 2, 3])
    broken = {2}

    @task(depends_on=[items], map_over="items")
    def tenfold(items: int) -> int:
        if items in broken:
            raise ValueError(items)
        return 10 * items

    flow = Flow(tenfold, fail_fast=False)
    await flow.arun()
    values = flow.value(items)
    values.append(4)
    flow.override(items, values)
    broken.clear()
    results = await flow.aresume()
    assert results["tenfold"].value == [10, 20, 30, 40]


@pytest.mark.anyio
async def test_an_iterator_stays_consumed_after_an_override_of_another_task() -> None:
    items = _source(iter([1, 2, 3]))

    @task
    def other() -> int:
        raise ValueError("not yet")

    @task(depends_on=[items], map_over="items")
    def first(items: int) -> int:
        return items

    @task(depends_on=[items, other], map_over="items")
    def second(items: int, other: int) -> int:
        return items

    flow = Flow(first, second, fail_fast=False)
    await flow.arun()  # `first` consumes the iterator; `second` waits for `other`
    flow.override(other, 0)
    results = await flow.aresume()
    assert results["first"].value == [1, 2, 3]
    assert "it is an iterator that 'first' already consumed" in str(results["second"].error)


@pytest.mark.anyio
async def test_a_mapped_async_step_over_many_quick_elements_keeps_few_instances_waiting_to_begin() -> None:
    items = _source(list(range(20 * BEGIN_AHEAD)))
    seen: list[int] = []

    @task(depends_on=[items], map_over="items")
    async def count_tasks(items: int) -> int:
        seen.append(len(anyio.get_running_tasks()))
        return items

    results = await Flow(count_tasks).arun()

    assert results["count_tasks"].value == list(range(20 * BEGIN_AHEAD))
    # A checkpoint after each BEGIN_AHEAD made lets them begin (on trio, in some order).
    assert max(seen) <= 4 * BEGIN_AHEAD, "the step's instances were made all at once"


@pytest.mark.anyio
async def test_every_instance_of_a_mapped_async_step_is_waiting_at_once_though_made_a_few_at_a_time() -> None:
    width = 3 * BEGIN_AHEAD
    items = _source(list(range(width)))
    rendezvous = Rendezvous(width)

    @task(depends_on=[items], map_over="items")
    async def wait_for_all(items: int) -> int:
        return await rendezvous.arrive(items)

    with anyio.fail_after(WAIT_S):
        results = await Flow(wait_for_all).arun()

    assert results["wait_for_all"].value == list(range(width))
