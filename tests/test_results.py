"""Results: the plain-text summary table."""

from __future__ import annotations

import pytest

from flowing import StepResult, StepState
from flowing._results import format_summary


@pytest.mark.parametrize(
    "name",
    ["データ処理", "cafe\u0301_menu", "tab\tand\nnewline"],
    ids=["wide", "combining", "control"],
)
def test_summary_columns_line_up_whatever_characters_a_task_name_holds(name: str) -> None:
    """Wide characters take two columns on a terminal, combining ones none, and a
    line break or tab in a name would break the row: each counts as it shows."""
    results = [
        StepResult(name, StepState.SUCCEEDED, duration_ms=1.0, attempts=1),
        StepResult("x" * 12, StepState.FAILED, duration_ms=2.0, attempts=3, reason="why"),
    ]
    lines = format_summary(results).splitlines()
    assert len(lines) == 3
    shown = lines[1].replace("\u0301", "")
    assert shown.index("1.0 ms") + _wide_extra(shown) == lines[2].index("2.0 ms")


def _wide_extra(text: str) -> int:
    """Columns beyond one per character that the wide characters of ``text`` take."""
    return sum(1 for ch in text if "\u3000" <= ch <= "\u9fff")


def test_a_multi_line_error_continues_under_its_own_column() -> None:
    results = [
        StepResult("parse", StepState.FAILED, error=ValueError("line one\nline two"), attempts=1),
        StepResult("after", StepState.SKIPPED, reason="dependency 'parse' failed"),
    ]
    assert format_summary(results).splitlines() == [
        "state    task   duration  attempts    error / reason",
        "FAILED   parse  0.0 ms    1           ValueError: line one",
        "                                      line two",
        "SKIPPED  after  0.0 ms    0           dependency 'parse' failed",
    ]
