"""What a run leaves behind: each task's state and result, and the summary table."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._frozen import quick_constructor


class StepState(enum.Enum):
    """The final state of one task in one run."""

    SUCCEEDED = "succeeded"  # the body returned (or the value was injected/replayed)
    FAILED = "failed"  # a gate raised, validate raised, or every attempt failed
    SKIPPED = "skipped"  # never ran: `when` was falsy, a dependency did not succeed, or fail_fast
    CANCELLED = "cancelled"  # the run was cancelled, timed out or its executor failed to start

    # Members are singletons compared by identity; Enum's own hash is a Python call
    # on the name, paid in every dict of states (progress counts two per task).
    __hash__ = object.__hash__


# Hot paths (once or twice per task) compare against these: on Python 3.11 reading a
# member off the Enum class is a Python-level lookup (0.18 µs; 0.03 µs on 3.12).
SUCCEEDED = StepState.SUCCEEDED
FAILED = StepState.FAILED


@dataclass(frozen=True, slots=True)
class StepResult:
    """The outcome of one task: its state, value or error, and how it got there.

    ``started_at``/``finished_at`` are ``time.monotonic()`` readings (None when the
    task never started); ``reason`` says why a task was skipped or cancelled.
    """

    name: str
    state: StepState
    value: Any = None
    error: BaseException | None = None
    duration_ms: float = 0.0
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    reason: str | None = None
    detached: bool = False
    cached: bool = False
    step_key: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.state is SUCCEEDED


make_result = quick_constructor(StepResult)  # for the engine: one per task

# The reason of a task's result replayed from the journal (a cache hit is cached too).
REPLAYED_REASON = "replayed from the journal"


_HEADERS = ("state", "task", "duration", "attempts", "", "error / reason")


def count_states(results: Iterable[StepResult]) -> dict[str, int]:
    """How many results are in each state, by state value, every state listed."""
    counts = dict.fromkeys(StepState, 0)  # by member: ``.value`` is a Python-level lookup
    for result in results:
        counts[result.state] += 1
    return {state.value: count for state, count in counts.items()}


def format_summary(results: Iterable[StepResult]) -> str:
    """A plain-text table, one row per task, in the order given."""
    rows = [_HEADERS] + [_summary_row(r) for r in results]
    widths = [max(_columns(row[col]) for row in rows) for col in range(len(_HEADERS) - 1)]
    continued = "\n" + " " * (sum(widths) + 2 * len(widths))  # a message's next lines
    lines = []
    for row in rows:
        cells = [cell + " " * (width - _columns(cell)) for cell, width in zip(row, widths)]
        lines.append("  ".join([*cells, row[-1].replace("\n", continued)]).rstrip())
    return "\n".join(lines)


def _columns(text: str) -> int:
    """How many terminal columns ``text`` takes: wide characters two, combining ones none."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        for ch in text
    )


def _summary_row(result: StepResult) -> tuple[str, ...]:
    return (
        result.state.value.upper(),
        "".join(" " if ch.isspace() or not ch.isprintable() else ch for ch in result.name),
        f"{result.duration_ms:.1f} ms",
        str(result.attempts),
        "detached" if result.detached else ("cached" if result.cached else ""),
        describe_outcome(result),
    )


def describe_outcome(result: StepResult) -> str:
    """Why ``result`` is as it is: its error described, else its reason ("" for none)."""
    if result.error is not None:
        return describe_error(result.error)
    return result.reason or ""


def describe_error(error: BaseException) -> str:
    """``Type: message``, even when the exception's own ``__str__`` is broken."""
    try:
        message = str(error)
    except Exception:
        message = "<exception str() failed>"
    kind = type(error).__name__
    return f"{kind}: {message}" if message else kind
