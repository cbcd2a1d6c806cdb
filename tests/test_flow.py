"""The Flow facade: run/arun, resume, override, value, summary, deadlines and re-entry."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from flowing import (
    Flow,
    FlowAlreadyRunningError,
    FlowDefinitionError,
    FlowTimeoutError,
    StepNotSucceededError,
    StepState,
    TaskNotRunError,
    task,
)

attempts: dict[str, int] = {}


@task
def step_1() -> int:
    return 1


@task(depends_on=[step_1])
def step_2(step_1: int) -> int:
    return step_1 + 1


@task(depends_on=[step_2])
def step_3(step_2: int) -> int:
    attempts["step_3"] = attempts.get("step_3", 0) + 1
    raise RuntimeError("upstream API is down")


@task(depends_on=[step_3])
def step_4(step_3: int) -> int:
    return step_3 * 10


@pytest.fixture(autouse=True)
def _reset_attempts() -> None:
    attempts.clear()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_blocks_and_returns_every_result_on_either_backend(backend: Any) -> None:
    flow = Flow(step_2)
    results = flow.run(backend=backend)
    assert list(results) == ["step_1", "step_2"]
    assert results["step_2"].value == 2
    assert flow.value(step_2) == 2


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_value_is_freed_with_its_flow_without_waiting_for_the_garbage_collector(
    backend: Any,
) -> None:
    class Big:
        pass

    made: list[weakref.ref[Big]] = []

    @task
    async def produce() -> Big:
        value = Big()
        made.append(weakref.ref(value))
        return value

    Flow(produce).run(backend=backend)  # trio's first import leaves cycles of its own
    gc.disable()
    try:
        flow = Flow(produce)
        flow.run(backend=backend)
        del flow
        assert made[-1]() is None
    finally:
        gc.enable()


@pytest.mark.anyio
async def test_arun_runs_inside_an_async_app() -> None:
    results = await Flow(step_2).arun()
    assert results["step_2"].value == 2


def test_the_seed_resume_scenario_keeps_succeeded_steps_and_runs_the_rest() -> None:
    flow = Flow(step_4)
    first = flow.run()
    assert first["step_3"].state is StepState.FAILED
    assert first["step_4"].state is StepState.SKIPPED
    flow.override(step_3, 5)
    second = flow.resume()
    assert attempts["step_3"] == 1  # the override replaced it; not run again
    assert second["step_1"] is first["step_1"]  # kept, not re-run
    assert second["step_4"].value == 50


def test_resume_reruns_failed_and_skipped_tasks() -> None:
    calls = {"flaky": 0, "after": 0}

    @task
    def flaky() -> int:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("first time")
        return 3

    @task(depends_on=[flaky])
    def after(flaky: int) -> int:
        calls["after"] += 1
        return flaky

    flow = Flow(after)
    flow.run()
    assert flow.results["after"].state is StepState.SKIPPED
    flow.resume()
    assert flow.value(after) == 3
    assert calls == {"flaky": 2, "after": 1}


def test_run_starts_again_but_keeps_overrides() -> None:
    flow = Flow(step_4)
    flow.override(step_3, 1)
    results = flow.run()
    assert results["step_3"].reason == "overridden"
    assert results["step_4"].value == 10
    assert "step_3" not in attempts


@pytest.mark.parametrize("then", ["run", "resume"])
def test_clear_override_has_the_next_run_run_the_task_again(then: str) -> None:
    flow = Flow(step_4)
    flow.override(step_3, 1)
    flow.run()
    flow.clear_override(step_3)
    assert "step_3" not in flow.results
    results = getattr(flow, then)()
    assert attempts["step_3"] == 1
    assert results["step_3"].state is StepState.FAILED  # its own body ran: it raises


def counted_chain(calls: list[str]) -> tuple[Any, Any, Any, Any]:
    """a -> b -> c -> d, each appending its name to ``calls``: 1, a+1, b*10, c+1."""

    @task
    def a() -> int:
        calls.append("a")
        return 1

    @task(depends_on=[a])
    def b(a: int) -> int:
        calls.append("b")
        return a + 1

    @task(depends_on=[b])
    def c(b: int) -> int:
        calls.append("c")
        return b * 10

    @task(depends_on=[c])
    def d(c: int) -> int:
        calls.append("d")
        return c + 1

    return a, b, c, d


def test_override_forgets_what_the_earlier_value_reached_so_resume_redoes_it() -> None:
    calls: list[str] = []
    _, b, _, d = counted_chain(calls)
    flow = Flow(d)
    flow.run()
    flow.override(b, 5)
    assert set(flow.results) == {"a", "b"}
    calls.clear()
    flow.resume()
    assert (calls, flow.value(d)) == (["c", "d"], 51)


def test_clear_override_forgets_what_the_overridden_value_reached_down_to_other_overrides() -> None:
    calls: list[str] = []
    _, b, c, d = counted_chain(calls)
    flow = Flow(d)
    flow.override(b, 5)
    flow.override(d, 0)
    flow.run()
    assert flow.value(c) == 50
    flow.clear_override(b)
    assert set(flow.results) == {"a", "d"}
    calls.clear()
    flow.resume()
    assert calls == ["b", "c"]
    assert (flow.value(c), flow.value(d)) == (20, 0)


def test_clear_override_of_a_task_without_one_changes_nothing() -> None:
    flow = Flow(step_2)
    before = flow.run()
    flow.clear_override(step_2)
    assert flow.results == before


def test_value_of_a_failed_task_names_it_and_chains_the_original_error() -> None:
    flow = Flow(step_4)
    flow.run()
    with pytest.raises(StepNotSucceededError) as caught:
        flow.value(step_3)
    assert str(caught.value) == (
        "task 'step_3' has no value: it is failed: RuntimeError: upstream API is down"
    )
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(StepNotSucceededError, match="'step_4' has no value: it is skipped"):
        flow.value(step_4)


def test_value_of_a_task_that_never_ran_is_a_key_error() -> None:
    flow = Flow(step_2)
    with pytest.raises(KeyError) as caught:
        flow.value(step_2)
    assert isinstance(caught.value, TaskNotRunError)
    assert str(caught.value) == "task 'step_2' has not run yet; call run() first"


@pytest.mark.parametrize(
    ("lookup", "error", "message"),
    [
        (lambda f: f.value(step_4), TaskNotRunError, "task 'step_4' is not part of this flow"),
        (lambda f: f.value("step_1"), TaskNotRunError, "task 'step_1' was given by name: value() takes the task itself"),
        (lambda f: f.value(["step_1"]), TypeError, "value() takes a task of this flow, got ['step_1']"),
        (lambda f: f.override(step_4, 1), FlowDefinitionError, "task 'step_4' is not part of this flow"),
        (lambda f: f.override("step_1", 1), FlowDefinitionError, "given by name: override() takes the task itself"),
        (lambda f: f.override(3, 1), FlowDefinitionError, "override() takes a task of this flow, got 3"),
        (lambda f: f.clear_override(step_4), FlowDefinitionError, "task 'step_4' is not part of this flow"),
        (lambda f: f.clear_override("step_1"), FlowDefinitionError, "given by name: clear_override() takes the task itself"),
    ],
    ids=["value-other-task", "value-by-name", "value-not-a-task", "override-other-task", "override-by-name", "override-not-a-task", "clear-other-task", "clear-by-name"],
)
def test_a_lookup_of_what_is_not_a_task_of_the_flow_says_what_to_pass(
    lookup: Any, error: type[Exception], message: str
) -> None:
    flow = Flow(step_1)
    flow.run()
    with pytest.raises(error) as caught:
        lookup(flow)
    assert message in str(caught.value)


def test_summary_shows_state_name_duration_attempts_and_error() -> None:
    flow = Flow(step_4)
    flow.run()
    lines = flow.summary().splitlines()
    assert lines[0].split()[:4] == ["state", "task", "duration", "attempts"]
    failed = next(line for line in lines if "step_3" in line)
    assert failed.startswith("FAILED") and "RuntimeError: upstream API is down" in failed
    skipped = next(line for line in lines if "step_4" in line)
    assert skipped.startswith("SKIPPED") and "dependency 'step_3' failed" in skipped


def test_results_is_a_copy() -> None:
    flow = Flow(step_1)
    flow.run()
    flow.results.clear()
    assert "step_1" in flow.results


def test_exceptions_from_tasks_never_escape_run() -> None:
    @task
    def explode() -> None:
        raise MemoryError("pretend")

    results = Flow(explode).run()
    assert isinstance(results["explode"].error, MemoryError)


@pytest.mark.anyio
async def test_run_works_even_when_an_event_loop_is_running_in_this_thread() -> None:
    results = Flow(step_2).run()
    assert results["step_2"].value == 2


@pytest.mark.anyio
async def test_the_same_flow_cannot_run_twice_at_once() -> None:
    started = anyio.Event()
    release = anyio.Event()

    @task
    async def hold() -> None:
        started.set()
        await release.wait()

    flow = Flow(hold)
    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.arun)
        await started.wait()
        with pytest.raises(FlowAlreadyRunningError, match="already running"):
            await flow.arun()
        release.set()
    assert flow.results["hold"].succeeded


@pytest.mark.anyio
@pytest.mark.parametrize(
    "change,call",
    [
        (lambda flow, first: flow.override(first, 100), r"override\('first', ...\)"),
        (lambda flow, first: flow.clear_override(first), r"clear_override\('first'\)"),
    ],
    ids=["override", "clear_override"],
)
async def test_changing_an_override_while_the_flow_runs_is_refused_and_the_run_goes_on(
    change: Callable[[Flow, Any], None], call: str
) -> None:
    started, release = anyio.Event(), anyio.Event()

    @task
    async def first() -> int:
        started.set()
        await release.wait()
        return 1

    @task(depends_on=[first])
    def second(first: int) -> int:
        return first + 1

    flow = Flow(second)
    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.arun)
        await started.wait()
        with pytest.raises(FlowAlreadyRunningError, match=call + " would change a result"):
            change(flow, first)
        release.set()
    assert flow.value(second) == 2


@pytest.mark.anyio
async def test_a_run_deadline_cancels_unfinished_tasks_and_resume_finishes_them() -> None:
    gate = {"block": True}

    @task
    def quick() -> int:
        return 1

    @task(depends_on=[quick])
    async def slow(quick: int) -> int:
        if gate["block"]:
            await anyio.sleep(30)
        return quick + 1

    @task(depends_on=[slow])
    def last(slow: int) -> int:
        return slow + 1

    flow = Flow(last)
    with anyio.fail_after(5):
        with pytest.raises(FlowTimeoutError, match="cancelled 'slow', 'last'") as caught:
            await flow.arun(timeout_s=0.1)
    assert caught.value.unfinished == ("slow", "last")
    assert flow.results["quick"].succeeded
    assert flow.results["slow"].state is StepState.CANCELLED
    assert flow.results["last"].state is StepState.CANCELLED
    gate["block"] = False
    results = await flow.aresume()
    assert results["last"].value == 3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f.run(backend="curio"), "backend must be one of"),
        (lambda f: f.run(timeout_s=0), "timeout_s must be None or a number > 0"),
        (lambda f: f.run(timeout_s=-2), "timeout_s must be None or a number > 0"),
        (lambda f: f.run(fresh="false"), "fresh must be True or False, got 'false'"),
        (lambda f: f.run(progress="no"), "progress must be True or False, got 'no'"),
    ],
    ids=["unknown-backend", "zero-deadline", "negative-deadline", "fresh-string", "progress-string"],
)
def test_bad_run_arguments_are_rejected(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(Flow(step_1))


NO_TRIO_CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["trio"] = None  # as if trio were not installed
    from flowing import Flow, task

    @task
    def one():
        return 1

    try:
        Flow(one).run(backend="trio")
    except LookupError as error:
        print(error)
    """
)


def test_run_on_a_backend_that_is_not_installed_raises_anyios_lookuperror() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TRIO_CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    assert "trio" in done.stdout and done.stderr == ""


def test_each_transition_is_logged_on_the_flowing_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flowing")
    Flow(step_4).run()
    messages = [r.getMessage() for r in caplog.records if r.name == "flowing"]
    assert any("task 'step_1' started, attempt 1 of 1" in m for m in messages)
    assert any("task 'step_1' succeeded" in m for m in messages)
    assert any("task 'step_3' failed" in m and "upstream API is down" in m for m in messages)
    assert any("task 'step_4' skipped" in m for m in messages)


@pytest.mark.parametrize(
    "first_attempt,cause",
    [(ValueError("flaky"), "(ValueError: flaky)"), (0, "(retry_until= said no)")],
    ids=["raised", "rejected"],
)
def test_a_retry_is_logged_with_why_the_attempt_did_not_stand(
    first_attempt: Any, cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes = [first_attempt, 1]

    @task(retry=1, retry_backoff_base_ms=0, retry_until=lambda value: value == 1)
    def flaky() -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    caplog.set_level(logging.INFO, logger="flowing")
    Flow(flaky).run()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries == [f"task 'flaky' attempt 1 of 2 failed {cause}; retrying in 0 ms"]


def test_the_library_is_silent_unless_logging_is_configured(capsys: pytest.CaptureFixture[str]) -> None:
    Flow(step_4).run()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
