"""The graph as text: Mermaid flowcharts and Graphviz DOT, coloured by state after a run.

Nodes are named ``n<index>`` in topological order and labelled with the task
name; detached tasks get a dashed outline and dashed incoming edges. Nothing here
runs a task or needs a graphviz binary.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping

from ._graph import Graph
from ._results import StepResult

# fill, stroke, text colour for each state a node can show.
_STATE_COLOURS = {
    "succeeded": ("#c8e6c9", "#2e7d32", "#1b5e20"),
    "cached": ("#bbdefb", "#1565c0", "#0d47a1"),
    "failed": ("#ffcdd2", "#c62828", "#b71c1c"),
    "skipped": ("#eeeeee", "#9e9e9e", "#616161"),
    "cancelled": ("#ffe0b2", "#ef6c00", "#e65100"),
}


def node_state(result: StepResult | None) -> str | None:
    """The colour class of a task's node: its state, or ``cached`` for a replayed success."""
    if result is None:
        return None
    if result.cached and result.succeeded:
        return "cached"
    return result.state.value


def to_mermaid(graph: Graph, results: Mapping[str, StepResult]) -> str:
    """A Mermaid ``flowchart LR``; after a run, one ``class`` line per state."""
    lines = ["flowchart LR"]
    for i, task in enumerate(graph.tasks):
        label = _mermaid_text(task.name + (" (detached)" if task.detached else ""))
        lines.append(f'    n{i}(["{label}"])' if task.detached else f'    n{i}["{label}"]')
    for i, deps in enumerate(graph.deps):
        arrow = "-.->" if graph.tasks[i].detached else "-->"
        lines.extend(f"    n{d} {arrow} n{i}" for d in deps)
    by_state = _nodes_by_state(graph, results)
    for state, nodes in by_state.items():
        fill, stroke, text = _STATE_COLOURS[state]
        lines.append(f"    classDef {state} fill:{fill},stroke:{stroke},color:{text}")
        lines.append(f"    class {','.join(nodes)} {state}")
    return "\n".join(lines) + "\n"


def to_dot(graph: Graph, results: Mapping[str, StepResult]) -> str:
    """A Graphviz ``digraph``; after a run, nodes are filled by state."""
    lines = [
        "digraph flow {",
        "    rankdir=LR;",
        '    node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica"];',
    ]
    for i, task in enumerate(graph.tasks):
        attributes = [f'label="{_dot_text(task.name)}"']
        if task.detached:
            attributes.append('style="rounded,filled,dashed"')
            attributes.append('xlabel="detached"')
        state = node_state(results.get(task.name))
        if state is not None:
            fill, stroke, text = _STATE_COLOURS[state]
            attributes += [f'fillcolor="{fill}"', f'color="{stroke}"', f'fontcolor="{text}"']
            attributes.append(f'tooltip="{state}"')
        lines.append(f"    n{i} [{', '.join(attributes)}];")
    for i, deps in enumerate(graph.deps):
        style = " [style=dashed]" if graph.tasks[i].detached else ""
        lines.extend(f"    n{d} -> n{i}{style};" for d in deps)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nodes_by_state(graph: Graph, results: Mapping[str, StepResult]) -> dict[str, list[str]]:
    by_state: dict[str, list[str]] = {}
    for i, task in enumerate(graph.tasks):
        state = node_state(results.get(task.name))
        if state is not None:
            by_state.setdefault(state, []).append(f"n{i}")
    return by_state


def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label: Mermaid's own entity codes for the
    characters it reads (``#`` starts an entity, ``%%`` a comment or a directive),
    a space for a line break or other control character."""
    return "".join(
        " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else _MERMAID_ESCAPES.get(ch, ch)
        for ch in text
    )


_MERMAID_ESCAPES = {'"': "#quot;", "<": "#lt;", ">": "#gt;", "#": "#35;", "%": "#37;"}


def _dot_text(text: str) -> str:
    """Text safe inside a quoted DOT string."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
