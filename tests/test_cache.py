"""@task(cache=True): results keyed on code and input values; unstable inputs never hit."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import logging
import pathlib
import subprocess
import sys
import threading
import uuid
from collections import OrderedDict, namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowing._cache
from flowing import Flow, FlowTimeoutError, InvalidTaskError, StepState, TaskDef, task
from flowing._cache import INLINE_BUDGET, Unencodable, _Budget, _OverBudget, value_digest


class Colour(enum.Enum):
    RED = 1
    ALSO_RED = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


Pair = namedtuple("Pair", "a b")


class MyList(list[int]):
    pass


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"x": 1, "y": [1, 2]}, {"y": [1, 2], "x": 1}),
        ({1, 2, 3}, {3, 2, 1}),
        (frozenset({"a", "b"}), frozenset({"b", "a"})),
        (Point(1, 2), Point(1, 2)),
        (datetime.date(2026, 1, 2), datetime.date(2026, 1, 2)),
        (decimal.Decimal("1.10"), decimal.Decimal("1.10")),
        (pathlib.PurePosixPath("/a/b"), pathlib.PurePosixPath("/a/b")),
    ],
    ids=["dict-order", "set-order", "frozenset", "dataclass", "date", "decimal", "path"],
)
def test_equal_values_have_equal_digests(a: Any, b: Any) -> None:
    assert value_digest(a) == value_digest(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, 1.0),
        (1, True),
        (1, "1"),
        (0.0, -0.0),
        ([1, 2], (1, 2)),
        ([1, 2], [2, 1]),
        ({1: 2}, {2: 1}),
        ("ab", b"ab"),
        (Colour.RED, Colour.ALSO_RED),
        (Pair(1, 2), (1, 2)),
        (Point(1, 2), Point(2, 1)),
        ([[1], [2]], [[1, 2]]),
        (["a", "b"], ["ab"]),
        (decimal.Decimal("1.10"), decimal.Decimal("1.1")),
    ],
    ids=repr,
)
def test_different_values_have_different_digests(a: Any, b: Any) -> None:
    assert value_digest(a) != value_digest(b)


def _cycle() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


def _dict_cycle() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


@pytest.mark.parametrize(
    "value",
    [
        object(),
        lambda: 1,
        MyList([1]),
        OrderedDict(a=1),
        _cycle(),
        _dict_cycle(),
        {"ok": 1, "not ok": object()},
        [1, {2, (3, object())}],
        Point(1, object()),  # type: ignore[arg-type]
    ],
    ids=[
        "object",
        "lambda",
        "list-subclass",
        "ordered-dict",
        "cycle",
        "dict-cycle",
        "nested-object",
        "deeply-nested-object",
        "dataclass-with-object",
    ],
)
def test_values_without_a_stable_encoding_are_refused(value: Any) -> None:
    with pytest.raises(Unencodable):
        value_digest(value)


def test_a_digest_is_the_same_in_another_process_with_another_hash_seed(tmp_path: Path) -> None:
    expression = (
        '{"set": {"a", "b", "c", 1, 2.5}, "when": datetime.datetime(2026, 1, 2, 3, 4), '
        '"id": uuid.UUID(int=7), "tags": frozenset({"x", "y"})}'
    )
    value = eval(expression)
    code = (
        "import datetime, uuid\nfrom flowing._cache import value_digest\n"
        f"print(value_digest({expression}))"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert digests == {value_digest(value)}


def test_an_encoding_over_the_inline_budget_stops_early() -> None:
    big = list(range(INLINE_BUDGET * 2))
    with pytest.raises(_OverBudget):
        value_digest(big, budget=_Budget(INLINE_BUDGET))
    assert value_digest(list(range(10)), budget=_Budget(INLINE_BUDGET))


@pytest.mark.anyio
async def test_a_large_input_hashed_in_a_worker_thread_still_hits() -> None:
    calls: list[int] = []

    @task
    def big() -> dict[str, list[int]]:
        return {"values": list(range(INLINE_BUDGET * 3))}

    @task(depends_on=[big], cache=True)
    def total(big: dict[str, list[int]]) -> int:
        calls.append(1)
        return sum(big["values"])

    flow = Flow(total)
    await flow.arun()
    result = (await flow.arun())["total"]
    assert (result.cached, len(calls)) == (True, 1)


def _counting(calls: list[Any], **options: Any) -> tuple[Any, Any]:
    @task
    def source() -> list[int]:
        return [1, 2, 3]

    @task(depends_on=[source], cache=True, **options)
    def total(source: list[int]) -> int:
        calls.append(source)
        return sum(source)

    return source, total


@pytest.mark.anyio
async def test_a_second_run_with_the_same_inputs_is_a_hit() -> None:
    calls: list[Any] = []
    _, total = _counting(calls)
    flow = Flow(total)
    await flow.arun()
    results = await flow.arun()
    assert len(calls) == 1
    result = results["total"]
    assert (result.state, result.value, result.cached) == (StepState.SUCCEEDED, 6, True)
    assert result.reason == "cached on its code and inputs"
    assert "cached" in flow.summary().splitlines()[-1]


@pytest.mark.anyio
async def test_other_inputs_miss() -> None:
    calls: list[Any] = []
    values = iter([[1], [2], [2]])

    @task
    def source() -> list[int]:
        return next(values)

    @task(depends_on=[source], cache=True)
    def total(source: list[int]) -> int:
        calls.append(source)
        return sum(source)

    flow = Flow(total)
    await flow.arun()
    await flow.arun()  # other input: a miss
    await flow.arun()  # same input again: a hit
    assert calls == [[1], [2]]


@pytest.mark.anyio
async def test_without_cache_true_nothing_is_cached() -> None:
    calls: list[Any] = []

    @task
    def source() -> int:
        return 1

    @task(depends_on=[source])
    def plain(source: int) -> int:
        calls.append(source)
        return source

    flow = Flow(plain)
    await flow.arun()
    await flow.arun()
    assert len(calls) == 2


@pytest.mark.anyio
async def test_an_input_without_a_stable_encoding_never_hits_and_warns_once_per_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[Any] = []

    @task
    def source() -> list[object]:
        return [object(), object(), object()]

    @task(depends_on=[source], map_over="source", cache=True)
    def use(source: object) -> int:
        calls.append(source)
        return 1

    flow = Flow(use)
    with caplog.at_level(logging.WARNING, logger="flowing"):
        await flow.arun()
    warnings = [r.getMessage() for r in caplog.records if "uncached" in r.getMessage()]
    assert warnings == [
        "task 'use' runs uncached: an input of type builtins.object has no stable encoding"
    ]
    results = await flow.arun()
    assert len(calls) == 6
    assert results["use"].cached is False


@pytest.mark.anyio
async def test_failures_and_skips_are_not_cached() -> None:
    outcomes = iter([ValueError("first"), 5])
    calls: list[int] = []

    @task(cache=True)
    def flaky() -> int:
        calls.append(1)
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    flow = Flow(flaky)
    assert (await flow.arun())["flaky"].state is StepState.FAILED
    assert (await flow.arun())["flaky"].value == 5
    assert (await flow.arun())["flaky"].cached is True
    assert len(calls) == 2


@pytest.mark.anyio
async def test_mapped_instances_are_cached_one_by_one() -> None:
    calls: list[int] = []
    broken = {2}

    @task
    def items() -> list[int]:
        return [0, 1, 2, 3]

    @task(depends_on=[items], map_over="items", cache=True)
    def square(items: int) -> int:
        calls.append(items)
        if items in broken:
            raise ValueError(items)
        return items * items

    flow = Flow(square, fail_fast=False)
    assert (await flow.arun())["square"].state is StepState.FAILED
    broken.clear()
    results = await flow.aresume()
    assert results["square"].value == [0, 1, 4, 9]
    assert sorted(calls) == [0, 1, 2, 2, 3]  # only the failed instance ran again


def test_the_cache_is_kept_in_the_journal_across_flows_and_graphs(tmp_path: Path) -> None:
    journal = tmp_path / "run.jsonl"
    calls: list[Any] = []

    @task
    def download() -> list[int]:
        return [1, 2, 3]

    @task
    def load_from_disk() -> list[int]:  # other code, same value
        return [3, 2, 1][::-1]

    def total(source: list[int]) -> int:
        calls.append(source)
        return sum(source)

    def total_edited(source: list[int]) -> int:
        calls.append(source)
        return sum(source) + 0

    first = task(depends_on=[task(name="source")(download.fn)], cache=True)(total)
    second = task(depends_on=[task(name="source")(load_from_disk.fn)], cache=True)(total)
    edited = task(depends_on=[task(name="source")(download.fn)], cache=True, name="total")(
        total_edited
    )
    assert Flow(first, journal_path=journal).run()["total"].cached is False
    result = Flow(second, journal_path=journal).run()["total"]
    assert (result.value, result.cached, len(calls)) == (6, True, 1)
    assert Flow(edited, journal_path=journal).run()["total"].cached is False  # other code
    assert len(calls) == 2


def test_mapped_instances_replay_from_the_journal_in_a_new_flow(tmp_path: Path) -> None:
    journal = tmp_path / "run.jsonl"
    calls: list[int] = []
    broken = {1}

    def build() -> Any:
        @task
        def items() -> list[int]:
            return [0, 1, 2]

        @task(depends_on=[items], map_over="items")
        def square(items: int) -> int:
            calls.append(items)
            if items in broken:
                raise ValueError(items)
            return items * items

        return square

    first = Flow(build(), journal_path=journal, fail_fast=False).run()["square"]
    assert first.state is StepState.FAILED
    broken.clear()
    result = Flow(build(), journal_path=journal).run()["square"]
    assert result.value == [0, 1, 4]
    assert sorted(calls) == [0, 1, 1, 2]  # a new Flow (as in a new process) re-ran only [1]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_cache_must_be_a_bool(value: Any) -> None:
    with pytest.raises(InvalidTaskError, match="cache of task 'step' must be True or False"):

        @task(cache=value)
        def step() -> None: ...


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=50, deadline=None)
@given(_JSONISH)
def test_a_digest_ignores_dict_insertion_order_and_object_identity(value: Any) -> None:
    def rebuilt(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rebuilt(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [rebuilt(item) for item in v]
        return v

    assert value_digest(rebuilt(value)) == value_digest(value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers()), st.lists(st.integers()))
def test_lists_of_ints_have_equal_digests_exactly_when_equal(a: list[int], b: list[int]) -> None:
    assert (value_digest(a) == value_digest(b)) == (a == b)


def test_a_fresh_run_forgets_cached_inputs_too() -> None:
    calls: list[int] = []

    @task(cache=True)
    def expensive() -> int:
        calls.append(1)
        return len(calls)

    flow = Flow(expensive)
    flow.run()
    flow.run()
    assert calls == [1]
    results = flow.run(fresh=True)
    assert calls == [1, 1]
    assert not results["expensive"].cached


@pytest.mark.anyio
async def test_cached_tasks_differing_only_in_a_captured_object_are_not_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Their code keys are equal (a builtin is captured opaquely): one must never be
    served the other's result."""

    @task
    def data() -> list[int]:
        return [1, 2, 3]

    def aggregate(name: str, pick: Callable[[list[int]], int]) -> TaskDef[..., int]:
        @task(name=name, depends_on=[data], cache=True)
        def agg(data: list[int]) -> int:
            return pick(data)

        return agg

    flow = Flow(aggregate("lo", min), aggregate("hi", max))
    await flow.arun()
    results = await flow.arun()
    assert [(results[n].value, results[n].cached) for n in ("lo", "hi")] == [(1, False), (3, False)]
    assert "task 'hi' runs uncached: its code has the same key as task 'lo'" in caplog.text


@pytest.mark.anyio
async def test_hashing_a_large_input_is_abandoned_when_the_run_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over the inline budget, an input is hashed in a worker thread: a deadline must
    not wait for that thread."""
    hashing_done = threading.Event()

    def key(self: Any, task: Any, kwargs: Any, budget: Any) -> str:
        if budget is not None:
            raise _OverBudget()
        hashing_done.wait(10)  # a hash far slower than the run's deadline
        return "key"

    monkeypatch.setattr(flowing._cache.ResultCache, "_key", key)

    @task(cache=True)
    def cached() -> int:
        return 1

    try:
        with anyio.fail_after(5), pytest.raises(FlowTimeoutError):
            await Flow(cached).arun(timeout_s=0.1)
    finally:
        hashing_done.set()
