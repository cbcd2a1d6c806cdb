"""One task's run: gates, retries with backoff, timeouts and thread abandonment."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from flowing import Event, Flow, StepState, TaskFinished, TaskRetrying, TaskStarted, task

pytestmark = pytest.mark.anyio
WAIT_S = 10  # a generous bound: only reached when something is broken


@task
def number() -> int:
    return 7


def sync_true(**kwargs: Any) -> bool:
    return True


async def async_true(**kwargs: Any) -> bool:
    return True


def sync_false(**kwargs: Any) -> bool:
    return False


async def async_false(**kwargs: Any) -> bool:
    return False


def sync_raise(*args: Any, **kwargs: Any) -> bool:
    raise LookupError("gate broke")


async def async_raise(*args: Any, **kwargs: Any) -> bool:
    raise LookupError("gate broke")


both_kinds = pytest.mark.parametrize("kind", ["sync", "async"])
GATES: dict[tuple[str, str], Callable[..., Any]] = {
    ("sync", "true"): sync_true,
    ("async", "true"): async_true,
    ("sync", "false"): sync_false,
    ("async", "false"): async_false,
    ("sync", "raise"): sync_raise,
    ("async", "raise"): async_raise,
}


@both_kinds
async def test_when_receives_the_dependency_values(kind: str) -> None:
    seen: dict[str, Any] = {}

    def spy(**kwargs: Any) -> bool:
        seen.update(kwargs)
        return True

    async def async_spy(**kwargs: Any) -> bool:
        return spy(**kwargs)

    @task(depends_on=[number], when=spy if kind == "sync" else async_spy)
    def gated(number: int) -> int:
        return number

    results = await Flow(gated).arun()
    assert seen == {"number": 7}
    assert results["gated"].value == 7


@both_kinds
async def test_a_falsy_when_skips_the_task_and_its_dependents(kind: str) -> None:
    ran: list[str] = []

    @task(depends_on=[number], when=GATES[kind, "false"])
    def gated(number: int) -> None:
        ran.append("gated")

    @task(depends_on=[gated])
    def after(gated: None) -> None:
        ran.append("after")

    results = await Flow(after).arun()
    assert ran == []
    assert results["gated"].state is StepState.SKIPPED
    assert results["gated"].reason == "when= returned a falsy value"
    assert results["after"].state is StepState.SKIPPED
    assert results["after"].reason == "dependency 'gated' skipped"


@pytest.mark.parametrize("gate", ["when", "validate"])
@both_kinds
async def test_a_raising_gate_fails_the_task_without_running_it(kind: str, gate: str) -> None:
    ran: list[str] = []

    @task(depends_on=[number], retry=3, retry_backoff_base_ms=0, **{gate: GATES[kind, "raise"]})
    def gated(number: int) -> None:
        ran.append("body")

    results = await Flow(gated).arun()
    assert ran == []
    assert results["gated"].state is StepState.FAILED
    assert results["gated"].attempts == 0
    assert isinstance(results["gated"].error, LookupError)


async def test_a_passing_validate_lets_the_body_run() -> None:
    @task(depends_on=[number], validate=lambda number: None)
    def checked(number: int) -> int:
        return number + 1

    results = await Flow(checked).arun()
    assert results["checked"].value == 8


async def test_a_failing_task_is_retried_until_it_succeeds() -> None:
    calls = 0

    @task(retry=3, retry_backoff_base_ms=1)
    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError(f"try {calls}")
        return "ok"

    results = await Flow(flaky).arun()
    assert results["flaky"].state is StepState.SUCCEEDED
    assert results["flaky"].attempts == 3
    assert results["flaky"].value == "ok"


async def test_a_task_failing_every_attempt_keeps_the_last_error() -> None:
    calls = 0

    @task(retry=2, retry_backoff_base_ms=1)
    async def hopeless() -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"attempt {calls}")

    results = await Flow(hopeless).arun()
    assert calls == 3
    assert results["hopeless"].attempts == 3
    assert str(results["hopeless"].error) == "attempt 3"


async def test_backoff_waits_on_the_loop_without_holding_a_worker_thread() -> None:
    order: list[str] = []
    first_failure = threading.Event()
    calls = 0

    @task(retry=1, retry_backoff_base_ms=300)
    def flaky() -> None:
        nonlocal calls
        calls += 1
        order.append(f"flaky-{calls}")
        if calls == 1:
            first_failure.set()
            raise ConnectionError("transient")

    @task
    async def wait_for_first_failure() -> None:
        await anyio.to_thread.run_sync(first_failure.wait, 5)

    @task(depends_on=[wait_for_first_failure])
    def other(wait_for_first_failure: None) -> None:
        order.append("other")

    results = await Flow(flaky, other, max_workers=1).arun()
    assert results["flaky"].succeeded and results["other"].succeeded
    assert order == ["flaky-1", "other", "flaky-2"]


@both_kinds
async def test_retry_until_retries_while_the_predicate_is_false(kind: str) -> None:
    calls = 0

    def enough(value: int) -> bool:
        return value >= 3

    async def async_enough(value: int) -> bool:
        return enough(value)

    @task(retry=5, retry_backoff_base_ms=0, retry_until=enough if kind == "sync" else async_enough)
    def counter() -> int:
        nonlocal calls
        calls += 1
        return calls

    results = await Flow(counter).arun()
    assert results["counter"].state is StepState.SUCCEEDED
    assert results["counter"].value == 3
    assert results["counter"].attempts == 3


async def test_retry_until_exhausted_fails_and_keeps_the_last_value() -> None:
    calls = 0

    @task(retry=1, retry_backoff_base_ms=0, retry_until=lambda value: False)
    def never_enough() -> int:
        nonlocal calls
        calls += 1
        return calls * 10

    results = await Flow(never_enough).arun()
    assert results["never_enough"].state is StepState.FAILED
    assert results["never_enough"].value == 20
    assert results["never_enough"].attempts == 2
    assert "retry_until" in (results["never_enough"].reason or "")


@both_kinds
async def test_a_raising_retry_until_fails_the_task_at_once(kind: str) -> None:
    calls = 0

    @task(retry=3, retry_backoff_base_ms=0, retry_until=GATES[kind, "raise"])
    def judged() -> int:
        nonlocal calls
        calls += 1
        return 5

    results = await Flow(judged).arun()
    assert calls == 1
    assert results["judged"].state is StepState.FAILED
    assert results["judged"].value == 5
    assert isinstance(results["judged"].error, LookupError)


async def test_an_async_body_that_times_out_is_cancelled_and_retried() -> None:
    cancelled = 0

    @task(timeout_s=0.05, retry=1, retry_backoff_base_ms=0)
    async def stuck() -> None:
        nonlocal cancelled
        try:
            await anyio.sleep(10)
        finally:
            cancelled += 1

    with anyio.fail_after(5):
        results = await Flow(stuck).arun()
    assert cancelled == 2
    assert results["stuck"].state is StepState.FAILED
    assert results["stuck"].attempts == 2
    assert isinstance(results["stuck"].error, TimeoutError)
    assert "task 'stuck' timed out after 0.05 s (attempt 2 of 2)" == str(results["stuck"].error)


async def test_an_abandoned_sync_body_keeps_its_worker_slot_until_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    slow_started = threading.Event()
    seen_release_when_next_ran: list[bool] = []

    @task(timeout_s=0.1)
    def slow() -> None:
        slow_started.set()
        release.wait(5)

    @task
    async def slow_is_running() -> None:
        await anyio.to_thread.run_sync(slow_started.wait, 5)

    @task(depends_on=[slow_is_running])
    def next_in_line(slow_is_running: None) -> None:
        seen_release_when_next_ran.append(release.is_set())

    @task
    async def releaser() -> None:
        await anyio.sleep(0.6)
        release.set()

    caplog.set_level(logging.WARNING, logger="flowing")
    results = await Flow(slow, next_in_line, releaser, max_workers=1, fail_fast=False).arun()
    assert isinstance(results["slow"].error, TimeoutError)
    assert results["next_in_line"].succeeded
    assert seen_release_when_next_ran == [True]
    assert "abandoned" in caplog.text


async def test_a_retry_waiting_for_a_worker_thread_is_not_timed_until_it_has_one() -> None:
    """The first attempt times out and its body keeps the only thread; the retry
    waits for that thread far longer than timeout_s, then runs and succeeds."""
    release = threading.Event()
    calls: list[int] = []
    events: list[Event] = []

    @task(timeout_s=0.05, retry=2, retry_backoff_base_ms=0)
    def fetch() -> str:
        calls.append(len(calls))
        if len(calls) == 1:
            release.wait(WAIT_S)  # hangs until well after the retry's timeout would be over
        return "ok"

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, TaskRetrying):
            threading.Timer(0.5, release.set).start()

    results = await Flow(fetch, max_workers=1, on_event=on_event).arun()
    assert (results["fetch"].state, results["fetch"].attempts, len(calls)) == (StepState.SUCCEEDED, 2, 2)
    assert [e.attempt for e in events if isinstance(e, TaskStarted)] == [1, 2]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_fail_fast_holds_back_a_retry_and_the_earlier_attempt_stands(is_async: bool) -> None:
    first_attempt_done, boom_failed = anyio.Event(), anyio.Event()
    calls: list[int] = []

    async def rejects_after_boom(value: int) -> bool:
        first_attempt_done.set()
        await boom_failed.wait()
        return False

    def body() -> int:
        calls.append(1)
        return len(calls)

    async def async_body() -> int:
        return body()

    flaky = task(
        async_body if is_async else body,
        name="flaky",
        retry=2,
        retry_until=rejects_after_boom,
        retry_backoff_base_ms=0,
    )

    @task
    async def boom() -> None:
        await first_attempt_done.wait()
        raise RuntimeError("boom")

    def on_event(event: Any) -> None:
        if isinstance(event, TaskFinished) and event.task == "boom":
            boom_failed.set()

    results = await Flow(flaky, boom, on_event=on_event).arun()
    result = results["flaky"]
    assert calls == [1]
    assert (result.state, result.value, result.attempts) == (StepState.FAILED, 1, 1)
    assert result.reason == "not retried: fail_fast stopped the run after 'boom' failed"


class _NoTruthValue:
    """What ``df["x"] > 0`` returns for a pandas Series: no answer to ``bool()``."""

    def __bool__(self) -> bool:
        raise ValueError("the truth value of a Series is ambiguous")


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"when": lambda: _NoTruthValue()}, "when= raised"),
        ({"retry": 1, "retry_until": lambda value: _NoTruthValue()}, "retry_until= raised"),
    ],
    ids=["when", "retry_until"],
)
async def test_a_gate_answer_without_a_truth_value_fails_its_task_not_the_run(
    options: dict[str, Any], reason: str
) -> None:
    @task(**options)
    def gated() -> int:
        return 1

    @task
    def other() -> int:
        return 2

    results = await Flow(gated, other, fail_fast=False).arun()
    assert (results["gated"].state, results["gated"].reason) == (StepState.FAILED, reason)
    assert str(results["gated"].error) == "the truth value of a Series is ambiguous"
    assert results["other"].state is StepState.SUCCEEDED
