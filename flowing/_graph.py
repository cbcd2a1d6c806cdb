"""Collecting a flow's graph from its terminal tasks, and validating it."""

from __future__ import annotations

import graphlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._exceptions import (
    DetachedDependencyError,
    DuplicateTaskNameError,
    FlowCycleError,
    FlowDefinitionError,
)
from ._task import TaskDef, registered_detached_tasks

AnyTask = TaskDef[..., Any]


@dataclass(frozen=True, slots=True)
class Graph:
    """A validated DAG, tasks numbered in topological order.

    ``deps[i]`` and ``dependents[i]`` hold the indices of task ``i``'s
    dependencies and dependents; every dependency has a smaller index.
    """

    tasks: tuple[AnyTask, ...]
    deps: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]
    index: dict[AnyTask, int]

    def __len__(self) -> int:
        return len(self.tasks)


def build_graph(terminals: Sequence[object]) -> Graph:
    """The graph behind ``terminals``, plus every detached task it can feed."""
    if not terminals:
        raise FlowDefinitionError("a Flow needs at least one task, e.g. Flow(last_step)")
    for terminal in terminals:
        if _is_collection_of_tasks(terminal):
            raise FlowDefinitionError(
                f"Flow got a {type(terminal).__name__} of tasks; pass the tasks themselves: "
                f"Flow(*tasks)"
            )
        if isinstance(terminal, Iterator):  # its items cannot be looked at without using them
            raise FlowDefinitionError(
                f"Flow got a {type(terminal).__name__}; pass the tasks themselves: Flow(*tasks)"
            )
        if not isinstance(terminal, TaskDef):
            hint = " (decorate it with @task)" if callable(terminal) else ""
            raise FlowDefinitionError(f"Flow got {terminal!r}, which is not a task{hint}")
    members = _collect_upstream(terminals)  # type: ignore[arg-type]
    _add_detached_followers(members)
    _check_unique_names(members)
    _check_detached_edges(members)
    ordered = _topological_order(members)
    index = {t: i for i, t in enumerate(ordered)}
    deps = tuple(tuple(index[d] for d in t.depends_on) for t in ordered)
    dependents: list[list[int]] = [[] for _ in ordered]
    for i, task_deps in enumerate(deps):
        for d in task_deps:
            dependents[d].append(i)
    return Graph(tuple(ordered), deps, tuple(tuple(ds) for ds in dependents), index)


def _is_collection_of_tasks(value: object) -> bool:
    """A list, tuple or set of tasks, given where the tasks themselves belong."""
    return (
        isinstance(value, (list, tuple, set, frozenset))
        and bool(value)
        and all(isinstance(item, TaskDef) for item in value)
    )


def _collect_upstream(terminals: Sequence[AnyTask]) -> dict[AnyTask, None]:
    """Every task reachable backwards from ``terminals``, without recursion.

    In depth-first post-order, terminals as given and dependencies in ``depends_on``
    order, so that the topological order keeps the order the user wrote.
    """
    members: dict[AnyTask, None] = {}
    seen: set[AnyTask] = set()
    stack: list[tuple[AnyTask, bool]] = [(t, False) for t in reversed(terminals)]
    while stack:
        current, expanded = stack.pop()
        if expanded:
            members[current] = None
        elif current not in seen:
            seen.add(current)
            stack.append((current, True))
            stack.extend((dep, False) for dep in reversed(current.depends_on) if dep not in seen)
    return members


def _add_detached_followers(members: dict[AnyTask, None]) -> None:
    """Add detached tasks whose dependencies are all in the graph, chains included."""
    candidates = [t for t in registered_detached_tasks() if t not in members]
    added = True
    while added and candidates:
        added = False
        for candidate in list(candidates):
            if candidate.depends_on and all(d in members for d in candidate.depends_on):
                members[candidate] = None
                candidates.remove(candidate)
                added = True


def _check_unique_names(members: Iterable[AnyTask]) -> None:
    seen: dict[str, AnyTask] = {}
    for member in members:
        if seen.setdefault(member.name, member) is not member:
            raise DuplicateTaskNameError(member.name)


def _check_detached_edges(members: Iterable[AnyTask]) -> None:
    for member in members:
        if member.detached:
            continue
        for dep in member.depends_on:
            if dep.detached:
                raise DetachedDependencyError(member.name, dep.name)


def _topological_order(members: Iterable[AnyTask]) -> list[AnyTask]:
    sorter: graphlib.TopologicalSorter[AnyTask] = graphlib.TopologicalSorter()
    for member in members:
        sorter.add(member, *member.depends_on)
    try:
        return list(sorter.static_order())
    except graphlib.CycleError as error:
        cycle: list[AnyTask] = error.args[1]
        raise FlowCycleError([t.name for t in cycle]) from None
