"""The workloads as plain data: nodes, their dependencies and what their bodies do.

Every body computes ``1 + max(values of its dependencies)`` (0 without any), so
the sink's value is the length of the longest path: a cheap check that a runner
passed every value along.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["sync", "async"]


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    deps: tuple[str, ...]
    kind: Kind
    sleep_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Spec:
    """One workload instance: nodes in topological order, the last one is the sink."""

    nodes: tuple[Node, ...]
    expected: int
    ideal_s: float | None = None  # the critical path, where sleeps make one

    @property
    def sink(self) -> str:
        return self.nodes[-1].name

    @property
    def kinds(self) -> set[Kind]:
        return {node.kind for node in self.nodes}


def depth(*values: Any) -> int:
    return 1 + max(values, default=0)


def sync_body(node: Node) -> Any:
    if node.sleep_s:
        delay = node.sleep_s

        def sleeper(*args: Any, **kwargs: Any) -> int:
            time.sleep(delay)
            return depth(*args, *kwargs.values())

        return sleeper

    def noop(*args: Any, **kwargs: Any) -> int:
        return depth(*args, *kwargs.values())

    return noop


def async_body(node: Node) -> Any:
    if node.sleep_s:
        delay = node.sleep_s

        async def asleeper(*args: Any, **kwargs: Any) -> int:
            await asyncio.sleep(delay)
            return depth(*args, *kwargs.values())

        return asleeper

    async def anoop(*args: Any, **kwargs: Any) -> int:
        return depth(*args, *kwargs.values())

    return anoop


def body(node: Node) -> Any:
    """A fresh function for ``node``: the same for every runner."""
    return sync_body(node) if node.kind == "sync" else async_body(node)


def fan_out(n: int, kind: Kind) -> Spec:
    """W1: root -> n no-op tasks -> one sink taking them all."""
    middle = tuple(Node(f"t{i}", ("root",), kind) for i in range(n))
    sink = Node("sink", tuple(node.name for node in middle), kind)
    return Spec((Node("root", (), kind), *middle, sink), expected=3)


def chain(n: int, kind: Kind) -> Spec:
    """W2: n no-op tasks, each depending on the previous one."""
    nodes = [Node("t0", (), kind)]
    nodes += [Node(f"t{i}", (f"t{i - 1}",), kind) for i in range(1, n)]
    return Spec(tuple(nodes), expected=n)


def io(n: int, kind: Kind = "async") -> Spec:
    """W3: n independent async tasks sleeping 50 ms, then a sink."""
    middle = tuple(Node(f"t{i}", (), "async", 0.05) for i in range(n))
    sink = Node("sink", tuple(node.name for node in middle), "async")
    return Spec((*middle, sink), expected=2, ideal_s=0.05)


def uneven(n: int = 10, kind: Kind = "sync") -> Spec:
    """W4: two chains of n sync sleeps, 100/10/100... ms and 10/100/10... ms, joined."""
    nodes: list[Node] = []
    for chain_name, first_long in (("a", True), ("b", False)):
        for i in range(n):
            long = (i % 2 == 0) == first_long
            deps = (f"{chain_name}{i - 1}",) if i else ()
            nodes.append(Node(f"{chain_name}{i}", deps, "sync", 0.1 if long else 0.01))
    nodes.append(Node("join", (f"a{n - 1}", f"b{n - 1}"), "sync"))
    ideal = sum(node.sleep_s for node in nodes if node.name.startswith("a"))
    return Spec(tuple(nodes), expected=n + 1, ideal_s=ideal)


def mixed(n: int, kind: Kind = "sync") -> Spec:
    """W6: n tasks, even ones async 1 ms sleeps, odd ones sync no-ops, then a sink.

    Task i depends on tasks (i - 1) // 2 and (i - 1) // 2 - 1, one of each kind,
    so async and sync tasks keep waiting on each other; the sink takes the leaves.
    """
    nodes: list[Node] = []
    for i in range(n):
        parent = (i - 1) // 2
        deps = tuple(f"t{d}" for d in (parent - 1, parent) if i and d >= 0)
        kind_i: Kind = "async" if i % 2 == 0 else "sync"
        nodes.append(Node(f"t{i}", deps, kind_i, 0.001 if kind_i == "async" else 0.0))
    has_dependents = {d for node in nodes for d in node.deps}
    leaves = tuple(node.name for node in nodes if node.name not in has_dependents)
    nodes.append(Node("sink", leaves, "sync"))
    return Spec(tuple(nodes), expected=_longest_path(nodes))


def _longest_path(nodes: list[Node]) -> int:
    value: dict[str, int] = {}
    for node in nodes:
        value[node.name] = depth(*(value[d] for d in node.deps))
    return value[nodes[-1].name]


BUILDERS = {"W1": fan_out, "W2": chain, "W3": io, "W4": uneven, "W6": mixed}


def build(workload: str, n: int, kind: Kind) -> Spec:
    return BUILDERS[workload](n, kind)
