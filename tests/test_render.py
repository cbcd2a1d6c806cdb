"""to_mermaid() and to_dot() describe the graph structurally, coloured by state after a run."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from flowing import Flow, task


@dataclass
class Parsed:
    """Nodes (id -> label), edges (src, dst, dashed), classes (id -> state), dashed nodes."""

    nodes: dict[str, str] = field(default_factory=dict)
    edges: set[tuple[str, str, bool]] = field(default_factory=set)
    states: dict[str, str] = field(default_factory=dict)
    dashed: set[str] = field(default_factory=set)


def parse_mermaid(text: str) -> Parsed:
    """A strict parser for the subset flowing writes: any other line fails the test."""
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    parsed = Parsed()
    defined: set[str] = set()
    for line in lines[1:]:
        if m := re.fullmatch(r'    (n\d+)\["([^"]*)"\]', line):
            parsed.nodes[m[1]] = m[2]
        elif m := re.fullmatch(r'    (n\d+)\(\["([^"]*)"\]\)', line):
            parsed.nodes[m[1]] = m[2]
            parsed.dashed.add(m[1])
        elif m := re.fullmatch(r"    (n\d+) (-->|-\.->) (n\d+)", line):
            parsed.edges.add((m[1], m[3], m[2] == "-.->"))
        elif m := re.fullmatch(r"    classDef (\w+) fill:#\w{6},stroke:#\w{6},color:#\w{6}", line):
            defined.add(m[1])
        elif m := re.fullmatch(r"    class ([\w,]+) (\w+)", line):
            assert m[2] in defined, f"class {m[2]} used before classDef"
            parsed.states.update(dict.fromkeys(m[1].split(","), m[2]))
        else:
            raise AssertionError(f"unexpected Mermaid line: {line!r}")
    return parsed


def parse_dot(text: str) -> Parsed:
    lines = text.splitlines()
    assert lines[:2] == ["digraph flow {", "    rankdir=LR;"]
    assert lines[-1] == "}"
    parsed = Parsed()
    for line in lines[3:-1]:
        if m := re.fullmatch(r"    (n\d+) \[(.*)\];", line):
            attributes = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2]))
            parsed.nodes[m[1]] = attributes["label"]
            if "dashed" in attributes.get("style", ""):
                parsed.dashed.add(m[1])
            if "tooltip" in attributes:
                parsed.states[m[1]] = attributes["tooltip"]
        elif m := re.fullmatch(r"    (n\d+) -> (n\d+)( \[style=dashed\])?;", line):
            parsed.edges.add((m[1], m[2], bool(m[3])))
        else:
            raise AssertionError(f"unexpected DOT line: {line!r}")
    return parsed


def by_name(parsed: Parsed) -> Parsed:
    """The same picture with node ids replaced by task names."""
    name = {node: label.removesuffix(" (detached)") for node, label in parsed.nodes.items()}
    return Parsed(
        nodes={n: n for n in name.values()},
        edges={(name[a], name[b], dashed) for a, b, dashed in parsed.edges},
        states={name[n]: state for n, state in parsed.states.items()},
        dashed={name[n] for n in parsed.dashed},
    )


def build_flow() -> Flow:
    @task
    def extract() -> int:
        return 1

    @task
    def broken() -> int:
        raise ValueError("no")

    @task(depends_on=[extract, broken])
    def join(extract: int, broken: int) -> int:
        return extract + broken

    @task(depends_on=[extract], detached=True)
    def notify(extract: int) -> None: ...

    return Flow(join, extract, fail_fast=False)


RENDERERS = pytest.mark.parametrize(
    "parse,render",
    [(parse_mermaid, Flow.to_mermaid), (parse_dot, Flow.to_dot)],
    ids=["mermaid", "dot"],
)
EDGES = {("extract", "join", False), ("broken", "join", False), ("extract", "notify", True)}


@RENDERERS
def test_before_a_run_the_picture_is_the_bare_graph(
    parse: Callable[[str], Parsed], render: Callable[[Flow], str]
) -> None:
    parsed = by_name(parse(render(build_flow())))
    assert set(parsed.nodes) == {"extract", "broken", "join", "notify"}
    assert parsed.edges == EDGES
    assert parsed.dashed == {"notify"}
    assert parsed.states == {}


@RENDERERS
def test_after_a_run_every_node_shows_its_state(
    parse: Callable[[str], Parsed], render: Callable[[Flow], str]
) -> None:
    flow = build_flow()
    flow.run()
    parsed = by_name(parse(render(flow)))
    assert parsed.states == {
        "extract": "succeeded",
        "broken": "failed",
        "join": "skipped",
        "notify": "succeeded",
    }
    assert parsed.edges == EDGES


def test_the_mermaid_label_marks_detached_tasks() -> None:
    labels = parse_mermaid(build_flow().to_mermaid()).nodes.values()
    assert "notify (detached)" in labels
    assert "join" in labels


@pytest.mark.parametrize(
    "name,mermaid,dot",
    [
        ('say "hi"', "say #quot;hi#quot;", 'say \\"hi\\"'),
        ("a<b>", "a#lt;b#gt;", "a<b>"),
        ("back\\slash", "back\\slash", "back\\\\slash"),
    ],
    ids=["quotes", "angles", "backslash"],
)
def test_task_names_are_escaped(name: str, mermaid: str, dot: str) -> None:
    step = task(lambda: None, name=name)
    flow = Flow(step)
    assert parse_mermaid(flow.to_mermaid()).nodes == {"n0": mermaid}
    assert parse_dot(flow.to_dot()).nodes == {"n0": dot}


@pytest.mark.parametrize(
    "name,label",
    [
        ("C#", "C#35;"),
        ("a#quot;b", "a#35;quot;b"),
        ("x %%{init}%%", "x #37;#37;{init}#37;#37;"),
        ("cr\rret\ttab", "cr ret tab"),
    ],
    ids=["hash", "entity-lookalike", "directive", "control-characters"],
)
def test_the_mermaid_label_uses_entity_codes_for_what_mermaid_reads(name: str, label: str) -> None:
    flow = Flow(task(lambda: None, name=name))
    assert parse_mermaid(flow.to_mermaid()).nodes == {"n0": label}


def test_rendering_runs_nothing() -> None:
    calls: list[str] = []
    step = task(lambda: calls.append("ran"), name="step")
    flow = Flow(step)
    flow.to_mermaid()
    flow.to_dot()
    assert calls == []
