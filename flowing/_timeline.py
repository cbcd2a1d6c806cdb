"""The last run as a Gantt chart, from the flow's run recorder: drawn as Mermaid or an image.

The critical path is the chain of tasks that decided when the run ended: from the
task that finished last, back through the dependency that finished last, and so on.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._exceptions import MissingExtraError, NoRunError
from ._graph import Graph
from ._render import node_state

if TYPE_CHECKING:
    from pathlib import Path

    from ._recorder import RunRecorder

IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
TEXT_SUFFIXES = (".mmd", ".md", ".txt")


@dataclass(frozen=True, slots=True)
class Bar:
    """One task of the last run, in milliseconds since the run started."""

    name: str
    index: int
    start_ms: float
    end_ms: float
    state: str
    detached: bool
    retries_ms: tuple[float, ...]
    critical: bool


def bars(recorder: RunRecorder, graph: Graph) -> list[Bar]:
    """The tasks that ran in the latest run, by start time, critical path marked."""
    if recorder.started is None:
        raise NoRunError("timeline()")
    origin = recorder.started
    # One copy, in C under the GIL: a run in another thread may be adding to it.
    finished = recorder.finished.copy()
    spans = {
        i: (r.started_at or origin, r.finished_at or r.started_at or origin, r)
        for i, r in finished.items()
        if r.started_at is not None and not r.cached
    }
    critical = _critical_path(graph, {i: end for i, (_, end, _) in spans.items()})
    ran = [
        Bar(
            name=r.name,
            index=i,
            start_ms=(start - origin) * 1000,
            end_ms=(end - origin) * 1000,
            state=node_state(r) or "",
            detached=r.detached,
            retries_ms=tuple((t - origin) * 1000 for t in recorder.retries.get(i, ())),
            critical=i in critical,
        )
        for i, (start, end, r) in spans.items()
    ]
    return sorted(ran, key=lambda b: (b.start_ms, b.index))


def _critical_path(graph: Graph, ends: dict[int, float]) -> set[int]:
    """Indices on the chain that ends at the last-finishing task, walking back by latest end."""
    if not ends:
        return set()
    current: int | None = max(ends, key=lambda i: (ends[i], -i))
    path: set[int] = set()
    while current is not None:
        path.add(current)
        ran = [d for d in graph.deps[current] if d in ends]
        current = max(ran, key=lambda d: (ends[d], -d)) if ran else None
    return path


def _title(tasks: int, duration_ms: float) -> str:
    return f"flowing run: {tasks} task{'' if tasks == 1 else 's'} in {duration_ms / 1000:.2f} s"


def to_gantt(bars: list[Bar], duration_ms: float) -> str:
    """Mermaid ``gantt`` text; critical-path tasks tagged ``crit`` (red), other successes ``done``."""
    lines = [
        "gantt",
        f"    title {_title(len(bars), duration_ms)}",
        "    dateFormat x",
        f"    axisFormat {'%S.%L s' if duration_ms < 60_000 else '%H:%M:%S'}",
    ]
    for section, detached in (("main", False), ("detached", True)):
        members = [b for b in bars if b.detached == detached]
        if members:
            lines.append(f"    section {section}")
            lines.extend(_gantt_line(b) for b in members)
    return "\n".join(lines) + "\n"


def _gantt_line(bar: Bar) -> str:
    succeeded = bar.state in ("succeeded", "cached")
    tags = ["crit"] if bar.critical else (["done"] if succeeded else [])
    label = _gantt_label(bar.name if succeeded else f"{bar.name} ({bar.state})")
    start = round(bar.start_ms)
    end = max(round(bar.end_ms), start + 1)
    return f"    {label} :{', '.join([*tags, f'n{bar.index}'])}, {start}, {end}"


def _gantt_label(text: str) -> str:
    """A task label Mermaid's gantt grammar reads as one task's text.

    A line break or other control character becomes a space; ``:`` ``#`` ``;`` end
    a task's text, so they become ``-`` ``-`` ``,``. ``%`` at the label's start or
    second place, or ``%%`` anywhere, starts a comment or a directive: such a label's
    ``%`` become the look-alike ``％``. A label that is blank or starts with a keyword
    (``title x``, ``section x``, ...) is put in single quotes.
    """
    label = _one_line(text).translate(_GANTT_SEPARATORS)
    if "%" in label[:2] or "%%" in label:
        label = label.replace("%", "\uff05")
    if not label.strip() or _GANTT_KEYWORD.match(label.lstrip()):
        label = f"'{label}'"
    return label


def _one_line(text: str) -> str:
    """``text`` with each control character or line or paragraph separator as a space."""
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


_GANTT_SEPARATORS = str.maketrans({":": "-", "#": "-", ";": ","})
# The statements of Mermaid's gantt lexer (case-insensitive), matched where a task's text
# would start (packages/mermaid/src/diagrams/gantt/parser/gantt.jison).
_GANTT_KEYWORD = re.compile(
    r"gantt|topaxis|inclusiveenddates|\d{4}-\d\d-\d\d|accdescr\s*\{"
    r"|(dateformat|axisformat|tickinterval|includes|excludes|todaymarker|weekday|weekend"
    r"|datemarker|title|accdescription|section|click|call|href)(\s|$)",
    re.IGNORECASE,
)


_BAR_COLOURS = {
    "succeeded": "#9ccc9c",
    "cached": "#90caf9",
    "failed": "#e57373",
    "skipped": "#bdbdbd",
    "cancelled": "#ffb74d",
}
_CRITICAL_COLOUR = "#1f4e9c"


def save_image(bars: list[Bar], duration_ms: float, path: Path) -> None:
    """Draw the bars with matplotlib (no pyplot, no global state) and save to ``path``."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise MissingExtraError(f"timeline(path={str(path)!r})", "matplotlib", "plot") from None
    height = max(2.0, 0.38 * len(bars) + 1.3)
    figure = Figure(figsize=(10, height), layout="constrained")
    axes = figure.add_subplot()
    for row, bar in enumerate(bars):
        _draw_bar(axes, row, bar)
    # parse_math=False: a name such as "$x" is text, not a formula for matplotlib to parse.
    axes.set_yticks(range(len(bars)), [_one_line(b.name) for b in bars], parse_math=False)
    for label, bar in zip(axes.get_yticklabels(), bars):
        if bar.critical:
            label.set_fontweight("bold")
    axes.invert_yaxis()
    axes.set_xlim(0, max(duration_ms, max((b.end_ms for b in bars), default=0)) / 1000 * 1.02)
    axes.set_xlabel("seconds since the run started")
    axes.set_title(_title(len(bars), duration_ms))
    axes.grid(axis="x", alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    states = sorted({b.state for b in bars if not b.critical} or {"succeeded"})
    handles = [Patch(color=_CRITICAL_COLOUR, label="critical path")] + [
        Patch(color=_BAR_COLOURS[s], label=s) for s in states if s in _BAR_COLOURS
    ]
    if any(b.detached for b in bars):
        handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="///", label="detached"))
    if any(b.retries_ms for b in bars):
        handles.append(_retry_handle())
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    figure.savefig(path, dpi=110)


def _draw_bar(axes: Any, row: int, bar: Bar) -> None:
    colour = _BAR_COLOURS.get(bar.state, "#bdbdbd")
    edge = colour
    if bar.critical:
        # A critical success is drawn in the critical colour; any other state keeps
        # its own colour inside a critical-coloured outline.
        colour = _CRITICAL_COLOUR if bar.state in ("succeeded", "cached") else colour
        edge = _CRITICAL_COLOUR
    width = max(bar.end_ms - bar.start_ms, 0.5) / 1000
    axes.barh(
        row,
        width,
        left=bar.start_ms / 1000,
        height=0.6,
        color=colour,
        edgecolor=edge,
        linewidth=2 if bar.critical else 1,
    )
    if bar.detached:
        hatch_colour = "#ffffff" if colour == _CRITICAL_COLOUR else "#555555"
        axes.barh(
            row, width, left=bar.start_ms / 1000, height=0.6,
            fill=False, hatch="///", edgecolor=hatch_colour, linewidth=0,
        )
    for retry in bar.retries_ms:
        axes.plot([retry / 1000] * 2, [row - 0.34, row + 0.34], color="#b71c1c", linewidth=2)


def _retry_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color="#b71c1c", linewidth=2, label="failed attempt, retried")


def timeline(recorder: RunRecorder, graph: Graph, path: str | os.PathLike[str] | None) -> str:
    """The Mermaid gantt of the latest run; also written to ``path`` (image or text) if given."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"timeline(path) takes a file path (a str or os.PathLike) such as 'run.png' or "
            f"'run.mmd', got {path!r}"
        )
    drawn = bars(recorder, graph)
    text = to_gantt(drawn, recorder.duration_ms())
    if path is None:
        return text
    from pathlib import Path  # only an image or file output needs it

    target = Path(path)
    suffix = target.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        save_image(drawn, recorder.duration_ms(), target)
    elif suffix in TEXT_SUFFIXES:
        target.write_text(text, encoding="utf-8")
    else:
        raise ValueError(
            f"timeline path {str(path)!r} must end in one of "
            f"{', '.join(IMAGE_SUFFIXES + TEXT_SUFFIXES)}"
        )
    return text
