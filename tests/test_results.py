"""Results: counting states, describing outcomes, and the summary table."""

from __future__ import annotations

import pytest

from flowing import StepResult, StepState
from flowing._results import count_states, describe_error, format_summary

SUCCEEDED, FAILED, SKIPPED = StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED


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


def test_every_state_is_counted_and_listed_even_when_no_result_has_it() -> None:
    results = [StepResult("a", SUCCEEDED), StepResult("b", SUCCEEDED), StepResult("c", FAILED)]
    assert count_states(results) == {"succeeded": 2, "failed": 1, "skipped": 0, "cancelled": 0}


def test_the_summary_aligns_one_row_per_task_and_ends_no_line_in_spaces() -> None:
    results = [
        StepResult("load", SUCCEEDED, duration_ms=1.5, attempts=1, cached=True),
        StepResult("notify", FAILED, error=ValueError("boom"), duration_ms=10, attempts=3, detached=True),
        StepResult("report", SKIPPED, reason="a dependency failed"),
        StepResult("total", SUCCEEDED, duration_ms=2, attempts=1),
    ]
    assert format_summary(results).splitlines() == [
        "state      task    duration  attempts            error / reason",
        "SUCCEEDED  load    1.5 ms    1         cached",
        "FAILED     notify  10.0 ms   3         detached  ValueError: boom",
        "SKIPPED    report  0.0 ms    0                   a dependency failed",
        "SUCCEEDED  total   2.0 ms    1",
    ]


@pytest.mark.parametrize(
    ("error", "described"),
    [(ValueError("boom"), "ValueError: boom"), (ValueError(), "ValueError")],
    ids=["with-message", "without-message"],
)
def test_an_error_is_described_by_its_type_and_message(error: Exception, described: str) -> None:
    assert describe_error(error) == described


def test_whitespace_and_control_characters_in_a_name_show_as_one_space_each() -> None:
    row = format_summary([StepResult("a\tb\x00c\nd", SUCCEEDED)]).splitlines()[1]
    assert row.split("  ")[1] == "a b c d"


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_an_error_whose_str_fails_is_still_described() -> None:
    assert describe_error(BrokenStr()) == "BrokenStr: <exception str() failed>"
