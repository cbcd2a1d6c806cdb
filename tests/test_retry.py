"""Retry policies: retry_on, jitter that never compounds, and the retry_after hint."""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import pytest

from flowing import Flow, InvalidTaskError, StepState, TaskRetrying, task
from flowing._attempt import StepContext, run_step
from flowing._events import Event
from flowing._retry import retry_delay_ms
from flowing._threads import ThreadSlots


class Throttled(Exception):
    def __init__(self, retry_after: Any) -> None:
        super().__init__("slow down")
        self.retry_after = retry_after


def _policy(**options: Any) -> Any:
    return task(**options)(lambda: None)


@pytest.mark.parametrize(
    ("failed_attempt", "expected_ms"),
    [(1, 1000), (2, 2000), (3, 4000), (4, 8000), (5, 16000), (6, 30000), (7, 30000)],
)
def test_delays_double_from_the_base_up_to_the_cap(failed_attempt: int, expected_ms: float) -> None:
    policy = _policy(retry=10)
    assert retry_delay_ms(policy, failed_attempt, ValueError()) == expected_ms


@pytest.mark.parametrize(
    ("u", "expected_ms"),
    [(0.0, 4000.0), (0.5, 3000.0), (0.999, 4000 * (1 - 0.5 * 0.999))],
    ids=["no-draw", "half-draw", "largest-draw"],
)
def test_jitter_takes_at_most_its_fraction_off_the_backoff(u: float, expected_ms: float) -> None:
    policy = _policy(retry=5, retry_jitter=0.5)
    assert retry_delay_ms(policy, 3, ValueError(), uniform=lambda: u) == pytest.approx(expected_ms)


def test_jitter_never_compounds_across_attempts() -> None:
    policy = _policy(retry=5, retry_jitter=0.9, retry_max_backoff_ms=10**9)
    draws = iter([0.999] * 5)
    delays = [
        retry_delay_ms(policy, k, ValueError(), uniform=lambda: next(draws)) for k in range(1, 6)
    ]
    # Each delay is the un-jittered backoff of its own attempt, shortened once.
    for k, delay in enumerate(delays, start=1):
        assert delay == pytest.approx(1000 * 2 ** (k - 1) * (1 - 0.9 * 0.999))
        assert delay > 0


@pytest.mark.parametrize(
    ("hint", "expected_ms"),
    [
        (5, 5000.0),
        (0.25, 1000.0),
        (datetime.timedelta(seconds=90), 90_000.0),
        (0, 1000.0),
    ],
    ids=["longer-than-backoff", "shorter-than-backoff", "timedelta-beyond-cap", "zero"],
)
def test_a_retry_after_hint_is_a_floor_on_the_delay(hint: Any, expected_ms: float) -> None:
    policy = _policy(retry=3, retry_max_backoff_ms=60_000)
    assert retry_delay_ms(policy, 1, Throttled(hint)) == expected_ms


@pytest.mark.parametrize("hint", [-1, float("nan"), float("inf"), "soon", True], ids=repr)
def test_an_unusable_retry_after_hint_is_ignored_with_a_warning(
    hint: Any, caplog: pytest.LogCaptureFixture
) -> None:
    policy = _policy(retry=3)
    with caplog.at_level(logging.WARNING, logger="flowing"):
        assert retry_delay_ms(policy, 2, Throttled(hint)) == 2000.0
    assert "ignoring retry_after" in caplog.text


def test_an_error_without_a_retry_after_hint_is_retried_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="flowing"):
        assert retry_delay_ms(_policy(retry=3), 1, ValueError()) == 1000.0
    assert caplog.records == []


def test_a_retry_on_that_is_not_a_class_is_named_without_a_hint() -> None:
    with pytest.raises(InvalidTaskError) as info:
        task(retry_on=(ValueError, 3))(lambda: None)
    assert str(info.value).endswith("must be an exception class or a tuple of them, got 3")


def test_the_warning_names_the_task_the_hint_and_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = _policy(retry=3, name="fetch")
    with caplog.at_level(logging.WARNING, logger="flowing"):
        retry_delay_ms(policy, 1, Throttled("soon"))
    assert caplog.messages == [
        "task 'fetch': ignoring retry_after='soon' on Throttled; it must be seconds >= 0 "
        "(a number or a timedelta)"
    ]


class HintProperty(Exception):
    @property
    def retry_after(self) -> float:
        raise RuntimeError("no response to read it from")


class HintLookup(Exception):
    def __getattr__(self, name: str) -> Any:
        raise KeyError(name)  # a lookup that does not raise AttributeError


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (HintProperty(), "RuntimeError: no response to read it from"),
        (HintLookup(), "KeyError: 'retry_after'"),
    ],
    ids=["property-raises", "getattr-raises"],
)
def test_a_retry_after_hint_that_cannot_be_read_is_ignored_with_a_warning(
    error: Exception, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    policy = _policy(retry=3, name="fetch")
    with caplog.at_level(logging.WARNING, logger="flowing"):
        assert retry_delay_ms(policy, 2, error) == 2000.0
    assert caplog.messages == [
        f"task 'fetch': ignoring retry_after on {type(error).__name__}: reading it raised {why}"
    ]


def test_a_zero_retry_after_hint_is_valid_and_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="flowing"):
        assert retry_delay_ms(_policy(retry=3), 1, Throttled(0)) == 1000.0
    assert caplog.records == []


def test_jitter_draws_from_random_when_no_draw_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("random.random", lambda: 0.5)
    policy = _policy(retry=5, retry_jitter=0.5)
    assert retry_delay_ms(policy, 3, ValueError()) == 3000.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_on": ()}, "retry_on of task 'step' is empty"),
        ({"retry_on": "ValueError"}, "must be an exception class"),
        ({"retry_on": (ValueError, 3)}, "got 3"),
        (
            {"retry_on": KeyboardInterrupt},
            "retry_on of task 'step' lists KeyboardInterrupt, which stops the run and is "
            "never retried; retry_on takes Exception subclasses",
        ),
        (
            {"retry_on": (ValueError, BaseException)},
            "retry_on of task 'step' lists BaseException, which stops the run and is "
            "never retried; retry_on takes Exception subclasses",
        ),
        (
            {"retry_on": [ConnectionError, TimeoutError]},
            "must be an exception class or a tuple of them, got [<class 'ConnectionError'>, "
            "<class 'TimeoutError'>]; pass a tuple: retry_on=(ConnectionError, TimeoutError)",
        ),
        ({"retry_on": [KeyError]}, "; pass a tuple: retry_on=(KeyError,)"),
        ({"retry_jitter": 1}, "retry_jitter of task 'step' must be a number in [0, 1)"),
        ({"retry_jitter": -0.1}, "retry_jitter"),
        ({"retry_jitter": float("nan")}, "retry_jitter"),
        ({"retry_jitter": True}, "retry_jitter"),
        ({"retry_jitter": False}, "retry_jitter"),
        ({"retry_jitter": "0.1"}, "retry_jitter"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_bad_retry_policies_are_rejected_at_declaration(
    options: dict[str, Any], message: str
) -> None:
    def step() -> None: ...

    with pytest.raises(InvalidTaskError) as info:
        task(**options)(step)
    assert message in str(info.value)


def _flaky(error: Exception, failures: int, **options: Any) -> tuple[Any, list[float]]:
    calls: list[float] = []

    @task(retry=3, retry_backoff_base_ms=0, **options)
    def step() -> str:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error
        return "ok"

    return step, calls


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "retry_on", "state", "attempts"),
    [
        (ConnectionError("down"), (ConnectionError, TimeoutError), StepState.SUCCEEDED, 3),
        (ConnectionResetError("reset"), ConnectionError, StepState.SUCCEEDED, 3),
        (ValueError("bad input"), (ConnectionError,), StepState.FAILED, 1),
        (ValueError("bad input"), None, StepState.SUCCEEDED, 3),
    ],
    ids=["listed", "subclass-of-listed", "not-listed-fails-at-once", "default-retries-all"],
)
async def test_retry_on_retries_only_the_listed_errors(
    error: Exception, retry_on: Any, state: StepState, attempts: int
) -> None:
    step, calls = _flaky(error, failures=2, retry_on=retry_on)
    result = (await Flow(step).arun())["step"]
    assert (result.state, result.attempts, len(calls)) == (state, attempts, attempts)
    if state is StepState.FAILED:
        assert result.error is error


@pytest.mark.anyio
async def test_retry_until_rejections_are_retried_whatever_retry_on_says() -> None:
    values = iter([1, 2, 3])

    @task(retry=3, retry_backoff_base_ms=0, retry_on=KeyError, retry_until=lambda v: v == 3)
    def step() -> int:
        return next(values)

    result = (await Flow(step).arun())["step"]
    assert (result.state, result.value, result.attempts) == (StepState.SUCCEEDED, 3, 3)


@pytest.mark.anyio
async def test_the_retry_after_hint_delays_the_next_attempt() -> None:
    step, calls = _flaky(Throttled(0.2), failures=1)
    events: list[Event] = []
    result = await run_step(step, 0, {}, StepContext(ThreadSlots(2), events.append, 1))
    assert (result.state, result.attempts) == (StepState.SUCCEEDED, 2)
    retrying = [e for e in events if isinstance(e, TaskRetrying)]
    assert [e.delay_ms for e in retrying] == [200.0]
    assert calls[1] - calls[0] >= 0.2 * 0.9  # generous lower bound; the sleep is the hint
