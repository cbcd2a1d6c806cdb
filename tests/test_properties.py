"""Property-based tests: random DAGs with random outcomes keep the scheduler's promises.

Each example draws a DAG of up to 8 tasks, each sync or async, that succeeds,
raises, is gated off by ``when``, is rejected by ``validate`` or fails a few
times before succeeding, with 0-2 retries, under fail_fast on or off.

The default "ci" profile (tests/conftest.py) draws a few dozen examples; for a
long soak run ``pytest tests/test_properties.py --hypothesis-profile=soak``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowing import Event, Flow, StepResult, StepState, TaskDef, TaskFinished, task

BEHAVIOURS = ("succeed", "raise", "when_false", "validate_raises", "flaky")
BACKENDS = ("asyncio", "trio")


@dataclass(frozen=True)
class TaskSpec:
    deps: tuple[int, ...]
    is_async: bool
    behaviour: str
    retry: int
    failures: int  # for "flaky": attempts that fail before one succeeds


@dataclass(frozen=True)
class FlowSpec:
    tasks: tuple[TaskSpec, ...]
    fail_fast: bool


@st.composite
def flow_specs(draw: st.DrawFn) -> FlowSpec:
    size = draw(st.integers(min_value=1, max_value=8))
    tasks = []
    for i in range(size):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        tasks.append(
            TaskSpec(
                deps=tuple(sorted(deps)),
                is_async=draw(st.booleans()),
                behaviour=draw(st.sampled_from(BEHAVIOURS)),
                retry=draw(st.integers(0, 2)),
                failures=draw(st.integers(1, 2)),
            )
        )
    return FlowSpec(tuple(tasks), fail_fast=draw(st.booleans()))


@dataclass
class Recorder:
    """What the task bodies and gates saw, across the runs of one example."""

    healed: bool = False  # once True, every task succeeds
    calls: Counter[str] = field(default_factory=Counter)  # body calls, this run
    visited: set[str] = field(default_factory=set)  # tasks whose gates or body ran, this run
    succeeded: set[str] = field(default_factory=set)  # bodies that returned, any run
    violations: list[str] = field(default_factory=list)
    failures_seen_at: list[float] = field(default_factory=list)  # when the run learnt of each
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_event(self, event: Event) -> None:
        if isinstance(event, TaskFinished) and event.result.state is StepState.FAILED:
            self.failures_seen_at.append(event.time)

    def new_run(self) -> None:
        self.calls.clear()
        self.visited.clear()
        self.failures_seen_at.clear()

    def visit(self, name: str) -> None:
        with self.lock:
            self.visited.add(name)

    def body(self, name: str, spec: TaskSpec, kwargs: dict[str, Any]) -> str:
        with self.lock:
            self.visited.add(name)
            self.calls[name] += 1
            calls = self.calls[name]
            deps = [f"t{d}" for d in spec.deps]
            not_done = [d for d in deps if d not in self.succeeded]
            if not_done:
                self.violations.append(f"{name} ran before {not_done} succeeded")
            if kwargs != {d: d for d in deps}:
                self.violations.append(f"{name} got {kwargs!r}")
        if not self.healed:
            if spec.behaviour == "raise" or (spec.behaviour == "flaky" and calls <= spec.failures):
                raise ValueError(f"{name} failed on call {calls}")
        with self.lock:
            self.succeeded.add(name)
        return name


def _build(spec: FlowSpec, rec: Recorder) -> Flow:
    defs: list[TaskDef[..., Any]] = []
    for i, ts in enumerate(spec.tasks):
        defs.append(_task(f"t{i}", ts, [defs[d] for d in ts.deps], rec))
    return Flow(*defs, fail_fast=spec.fail_fast, on_event=rec.on_event)


def _task(name: str, spec: TaskSpec, deps: list[TaskDef[..., Any]], rec: Recorder) -> TaskDef[..., Any]:
    def when(**kwargs: Any) -> bool:
        rec.visit(name)
        return rec.healed

    def validate(**kwargs: Any) -> None:
        rec.visit(name)
        if not rec.healed:
            raise ValueError(f"{name} rejected its inputs")

    options: dict[str, Any] = {
        "name": name,
        "depends_on": deps,
        "retry": spec.retry,
        "retry_backoff_base_ms": 0,
    }
    if spec.behaviour == "when_false":
        options["when"] = when
    if spec.behaviour == "validate_raises":
        options["validate"] = validate

    if spec.is_async:

        async def async_body(**kwargs: Any) -> str:
            await anyio.sleep(0)
            return rec.body(name, spec, kwargs)

        return task(**options)(async_body)

    def sync_body(**kwargs: Any) -> str:
        return rec.body(name, spec, kwargs)

    return task(**options)(sync_body)


def _expected(spec: FlowSpec) -> dict[str, tuple[StepState, int]]:
    """Without fail_fast: each task's final state and body calls, from the spec alone."""
    expected: dict[str, tuple[StepState, int]] = {}
    for i, ts in enumerate(spec.tasks):
        expected[f"t{i}"] = _outcome(ts, [expected[f"t{d}"][0] for d in ts.deps])
    return expected


def _outcome(ts: TaskSpec, dep_states: list[StepState]) -> tuple[StepState, int]:
    if any(state is not StepState.SUCCEEDED for state in dep_states):
        return StepState.SKIPPED, 0
    if ts.behaviour == "when_false":
        return StepState.SKIPPED, 0
    if ts.behaviour == "validate_raises":
        return StepState.FAILED, 0
    if ts.behaviour == "raise":
        return StepState.FAILED, 1 + ts.retry
    if ts.behaviour == "flaky":
        if ts.failures <= ts.retry:
            return StepState.SUCCEEDED, ts.failures + 1
        return StepState.FAILED, 1 + ts.retry
    return StepState.SUCCEEDED, 1


def _signature(results: dict[str, StepResult]) -> dict[str, tuple[Any, ...]]:
    """What must not depend on the backend (a skip names whichever blocker came first)."""
    return {
        name: (r.state, r.value, r.attempts, repr(r.error)) for name, r in results.items()
    }


@pytest.fixture(autouse=True)
def _quiet_logger() -> Iterator[None]:
    flowing_logger = logging.getLogger("flowing")
    flowing_logger.disabled = True
    yield
    flowing_logger.disabled = False


@given(flow_specs())
def test_random_dags_keep_the_scheduler_invariants_on_both_backends(spec: FlowSpec) -> None:
    signatures = []
    for backend in BACKENDS:
        rec = Recorder()
        flow = _build(spec, rec)
        results = flow.run(backend=backend)  # type: ignore[arg-type]

        assert rec.violations == []
        assert set(results) == {f"t{i}" for i in range(len(spec.tasks))}
        for i, ts in enumerate(spec.tasks):
            assert rec.calls[f"t{i}"] <= 1 + ts.retry
        if spec.fail_fast:
            _check_fail_fast(spec, results, rec)
        else:
            expected = _expected(spec)
            assert {n: (r.state, rec.calls[n]) for n, r in results.items()} == expected
            _check_skips_name_their_blocker(spec, results)
        signatures.append(_signature(results))

        _check_resume_runs_exactly_the_unfinished(flow, results, rec)

    if not spec.fail_fast:
        assert signatures[0] == signatures[1], "asyncio and trio disagree"


def _check_fail_fast(spec: FlowSpec, results: dict[str, StepResult], rec: Recorder) -> None:
    failures = [r for r in results.values() if r.state is StepState.FAILED]
    held_back = [r for r in results.values() if r.reason and "fail_fast" in r.reason]
    if not failures:
        assert not held_back
        assert {n: (r.state, rec.calls[n]) for n, r in results.items()} == _expected(spec)
        return
    # A body may fail in its thread a moment before the run learns of it: what
    # fail_fast promises is that nothing starts once the run knows.
    first_failure = min(rec.failures_seen_at)
    for r in results.values():
        if r.started_at is not None:
            assert r.started_at <= first_failure, f"{r.name} started after fail_fast stopped the run"
    for i, ts in enumerate(spec.tasks):
        r = results[f"t{i}"]
        if r in held_back and r.state is StepState.FAILED:  # fail_fast started no retry
            assert (r.reason or "").startswith("not retried: fail_fast")
            assert 1 <= rec.calls[r.name] == r.attempts <= ts.retry
        elif r in held_back:
            assert r.state is StepState.SKIPPED and r.started_at is None
            assert rec.calls[r.name] == 0
        else:
            deps = [results[f"t{d}"].state for d in ts.deps]
            assert (r.state, rec.calls[r.name]) == _outcome(ts, deps), r.name


def _check_skips_name_their_blocker(spec: FlowSpec, results: dict[str, StepResult]) -> None:
    for i, ts in enumerate(spec.tasks):
        r = results[f"t{i}"]
        blocked = [f"t{d}" for d in ts.deps if not results[f"t{d}"].succeeded]
        if blocked:
            assert r.reason is not None and any(repr(b) in r.reason for b in blocked)


def _check_resume_runs_exactly_the_unfinished(
    flow: Flow, first: dict[str, StepResult], rec: Recorder
) -> None:
    unfinished = {name for name, r in first.items() if not r.succeeded}
    rec.healed = True
    rec.new_run()

    results = flow.resume()

    assert rec.violations == []
    assert rec.visited == unfinished
    assert all(r.succeeded for r in results.values())
    assert {n: r.value for n, r in results.items()} == {n: n for n in results}
