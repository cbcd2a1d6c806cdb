"""Collecting the graph from terminals, detached discovery, and validation."""

from __future__ import annotations

from typing import Any

import pytest

from flowing import (
    DetachedDependencyError,
    DuplicateTaskNameError,
    Flow,
    FlowCycleError,
    FlowDefinitionError,
    task,
)
from flowing._graph import build_graph


@task
def a() -> int:
    return 1


@task(depends_on=[a])
def b(a: int) -> int:
    return a


@task(depends_on=[a])
def c(a: int) -> int:
    return a


@task(depends_on=[b, c])
def d(b: int, c: int) -> int:
    return b + c


def names(flow: Flow) -> list[str]:
    return [t.name for t in flow.tasks]


def test_the_graph_is_collected_backwards_from_the_terminals() -> None:
    assert set(names(Flow(d))) == {"a", "b", "c", "d"}
    assert set(names(Flow(b))) == {"a", "b"}


def test_tasks_come_in_dependency_order() -> None:
    order = names(Flow(d))
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")


@task
def x() -> int:
    return 1


@task
def y() -> int:
    return 2


@pytest.mark.parametrize(
    ("terminals", "order"),
    [
        ((x, y), ["x", "y"]),
        ((y, x), ["y", "x"]),
        ((d,), ["a", "b", "c", "d"]),
        ((c, b), ["a", "c", "b"]),
        ((x, d, y), ["x", "a", "y", "b", "c", "d"]),
    ],
    ids=["x-y", "y-x", "d", "c-b", "x-d-y"],
)
def test_independent_tasks_keep_the_order_they_were_given_in(
    terminals: tuple[Any, ...], order: list[str]
) -> None:
    """Terminals in the order passed to Flow, dependencies in depends_on order: so
    results, the summary and the pictures read as written, and with one worker
    thread ready tasks start in that order."""
    assert names(Flow(*terminals)) == order


def test_indices_of_dependencies_are_smaller_than_their_dependents() -> None:
    graph = build_graph([d])
    for i, deps in enumerate(graph.deps):
        assert all(dep < i for dep in deps)
        for dep in deps:
            assert i in graph.dependents[dep]


def test_the_index_maps_each_task_to_its_position() -> None:
    graph = build_graph([d])
    assert graph.index == {t: i for i, t in enumerate(graph.tasks)}


def test_detached_tasks_whose_dependencies_are_in_the_graph_join_it() -> None:
    @task(depends_on=[d], detached=True)
    def notify(d: int) -> None: ...

    @task(depends_on=[notify], detached=True)
    def audit(notify: None) -> None: ...

    @task(depends_on=[b, notify], detached=True)
    def mixed(b: int, notify: None) -> None: ...

    assert {"notify", "audit", "mixed"} <= set(names(Flow(d)))


def test_detached_tasks_with_a_dependency_outside_the_graph_stay_out() -> None:
    @task(depends_on=[d], detached=True)
    def notify(d: int) -> None: ...

    assert "notify" not in names(Flow(b))


def test_detached_tasks_without_dependencies_are_never_auto_discovered() -> None:
    @task(detached=True)
    def orphan() -> None: ...

    assert "orphan" not in names(Flow(d))


def test_two_different_tasks_with_one_name_are_rejected() -> None:
    @task(name="a")
    def impostor() -> int:
        return 2

    @task(depends_on=[a, impostor])
    def both(**kwargs: Any) -> None: ...

    with pytest.raises(DuplicateTaskNameError, match="two different tasks are named 'a'"):
        Flow(both)


def test_a_main_task_depending_on_a_detached_task_is_rejected() -> None:
    @task(depends_on=[a], detached=True)
    def side(a: int) -> int:
        return a

    @task(depends_on=[side])
    def after(side: int) -> None: ...

    with pytest.raises(DetachedDependencyError, match="'after' depends on detached task 'side'"):
        Flow(after)


@pytest.mark.parametrize("side_listed_last", [True, False])
def test_a_detached_terminal_does_not_hide_a_main_task_depending_on_it(
    side_listed_last: bool,
) -> None:
    @task(depends_on=[a], detached=True)
    def side(a: int) -> int:
        return a

    @task(depends_on=[side])
    def after(side: int) -> None: ...

    terminals = (after, side) if side_listed_last else (side, after)
    with pytest.raises(DetachedDependencyError, match="'after' depends on detached task 'side'"):
        Flow(*terminals)


def test_a_cycle_is_reported_with_the_tasks_on_it() -> None:
    @task
    def first(**kwargs: Any) -> None: ...

    @task(depends_on=[first])
    def second(first: None) -> None: ...

    first.depends_on = (second,)  # the API cannot build a cycle; force one
    with pytest.raises(FlowCycleError) as caught:
        Flow(second)
    assert set(caught.value.cycle) == {"first", "second"}
    assert "cycle" in str(caught.value)


@pytest.mark.parametrize(
    ("terminals", "message"),
    [
        ((), "a Flow needs at least one task"),
        ((len,), "which is not a task (decorate it with @task)"),
        (("d",), "Flow got 'd', which is not a task"),
        (([a, b],), "Flow got a list of tasks; pass the tasks themselves: Flow(*tasks)"),
        (((a,),), "Flow got a tuple of tasks; pass the tasks themselves: Flow(*tasks)"),
        (((t for t in [a]),), "Flow got a generator; pass the tasks themselves: Flow(*tasks)"),
    ],
    ids=["no-tasks", "plain-function", "string", "list-of-tasks", "tuple-of-tasks", "generator"],
)
def test_bad_terminals_are_rejected(terminals: tuple[Any, ...], message: str) -> None:
    with pytest.raises(FlowDefinitionError) as caught:
        Flow(*terminals)
    assert message in str(caught.value)


def test_only_a_callable_terminal_is_told_to_decorate_it_with_task() -> None:
    with pytest.raises(FlowDefinitionError) as caught:
        Flow("d")  # type: ignore[arg-type]
    assert str(caught.value).endswith("which is not a task")


@pytest.mark.parametrize("max_workers", [0, -1, 1.5, True, "4"])
def test_max_workers_must_be_a_positive_int(max_workers: Any) -> None:
    with pytest.raises(FlowDefinitionError, match="max_workers must be an int >= 1"):
        Flow(d, max_workers=max_workers)


@pytest.mark.parametrize(("option", "value"), [("fail_fast", "no"), ("tracing", 1)])
def test_a_flows_switches_must_be_true_or_false(option: str, value: Any) -> None:
    with pytest.raises(FlowDefinitionError, match=f"{option} must be True or False, got {value!r}"):
        Flow(d, **{option: value})


def test_definition_errors_are_value_errors() -> None:
    assert issubclass(FlowDefinitionError, ValueError)


def test_a_deep_chain_is_collected_without_recursion() -> None:
    previous = task(lambda: 0, name="t0")
    for i in range(1, 5000):
        previous = task(lambda **kw: 0, name=f"t{i}", depends_on=[previous])
    assert len(Flow(previous).tasks) == 5000
