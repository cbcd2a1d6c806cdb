"""Progress: on a terminal a rich live display reading the run recorder, elsewhere plain lines."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
from collections import deque
from typing import Any

import anyio
import anyio.from_thread
import pytest

from _flows import flaky_broken_report

from flowing import (
    Event,
    Flow,
    FlowStarted,
    StepResult,
    StepState,
    TaskDef,
    TaskFinished,
    TaskStarted,
    task,
)
from flowing._progress import PlainDisplay, RichDisplay, Tally, make_display
from flowing._recorder import RunRecorder


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def text(self) -> str:
        """What was written, without colours and line wrapping."""
        return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", self.getvalue()).split())


def flaky_broken_events() -> list[Event]:
    """The events of a run of ``flaky_broken_report``, for a display to be fed by hand."""
    seen: list[Event] = []
    flaky_broken_report(seen.append).run()
    return seen


def recorded(events: list[Event]) -> RunRecorder:
    """A run recorder that took in ``events``."""
    recorder = RunRecorder()
    for event in events:
        recorder(event)
    return recorder


def drawn(display: RichDisplay, width: int = 100) -> str:
    """What ``display`` draws now, as plain text."""
    from rich.console import Console

    screen = Console(file=io.StringIO(), width=width, record=True)
    screen.print(display.render())
    return screen.export_text()


def test_without_a_terminal_each_event_is_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Event] = []
    flaky_broken_report(seen.append).run(progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(seen)
    words = [line.split()[2:4] for line in lines]
    assert words == [
        ["flow", "started:"],
        ["start", "flaky"],
        ["retry", "flaky"],
        ["start", "flaky"],
        ["ok", "flaky"],
        ["start", "broken"],
        ["FAILED", "broken"],
        ["skipped", "report"],
        ["flow", "finished"],
    ]
    assert "failed (ConnectionError: first call fails); next in 0 ms" in lines[2]
    assert "ValueError: bad row" in lines[6]
    assert "(dependency 'broken' failed)" in lines[7]
    assert lines[-1].startswith("[3/3]")


@pytest.mark.anyio
async def test_a_sync_body_abandoned_by_a_cancelled_run_is_not_said_to_have_timed_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    release = threading.Event()
    scope = anyio.CancelScope()

    @task
    def stuck() -> None:
        anyio.from_thread.run_sync(scope.cancel)  # the body is running: cancel the run
        release.wait(30)

    with scope:
        await Flow(stuck).arun(progress=True)
    release.set()
    lines = capsys.readouterr().err.splitlines()
    abandoned = [line.split("  abandoned  ", 1)[1] for line in lines if "  abandoned  " in line]
    assert abandoned == ["stuck  sync body abandoned (timed out or cancelled), its thread runs on"]


def test_progress_never_changes_the_results(capsys: pytest.CaptureFixture[str]) -> None:
    def outcome(progress: bool) -> dict[str, tuple[StepState, int]]:
        results = flaky_broken_report().run(progress=progress)
        return {name: (r.state, r.attempts) for name, r in results.items()}

    assert outcome(progress=True) == outcome(progress=False)


def test_without_progress_nothing_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    flaky_broken_report().run()
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "file,rich_installed,expected",
    [
        (io.StringIO(), True, PlainDisplay),
        (FakeTerminal(), True, RichDisplay),
        (FakeTerminal(), False, PlainDisplay),
    ],
    ids=["pipe", "terminal", "terminal-without-rich"],
)
def test_the_display_is_chosen_by_terminal_and_rich(
    file: io.StringIO, rich_installed: bool, expected: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("rich")
    if not rich_installed:
        monkeypatch.setitem(sys.modules, "rich.live", None)
    assert type(make_display(file, RunRecorder())) is expected


def test_the_rich_display_shows_counts_running_tasks_and_retries() -> None:
    pytest.importorskip("rich")
    display = RichDisplay(FakeTerminal(), recorded(flaky_broken_events()[:4]))  # up to flaky's 2nd attempt
    text = drawn(display)
    assert "0/3" in text
    assert "1 running" in text
    assert "1 retries" in text
    assert "flaky" in text and "attempt 2/2" in text


def test_the_rich_display_prints_each_retry_above_itself() -> None:
    pytest.importorskip("rich")
    terminal = FakeTerminal()
    recorder = RunRecorder()
    display = RichDisplay(terminal, recorder)
    display.start()
    for event in flaky_broken_events()[:4]:
        recorder(event)
    display.stop()
    assert "↻ flaky attempt 1/2 failed: ConnectionError: first call fails (retry in 0 ms)" in terminal.text()


def test_the_rich_display_shows_a_task_waiting_for_its_retry() -> None:
    pytest.importorskip("rich")
    display = RichDisplay(FakeTerminal(), recorded(flaky_broken_events()[:3]))  # retry not started
    assert "attempt 1/2 failed, retry in 0.0s" in drawn(display)


def test_the_rich_display_shows_nothing_of_the_run_before_its_own() -> None:
    pytest.importorskip("rich")
    display = RichDisplay(FakeTerminal(), recorded(flaky_broken_events()))
    assert "3/3" in drawn(display)
    display.tally.show_next_run()
    text = drawn(display)
    assert "0/0" in text and "✗ 0 failed" in text


@pytest.mark.parametrize(
    "completed,total,done,expected",
    [
        (0, 10, False, ("", "━" * 40)),
        (5, 10, False, ("━" * 20, "╺" + "━" * 19)),
        (1, 80, False, ("╸", "━" * 39)),
        (10, 10, True, ("━" * 40, "")),
        (0, 0, True, ("", "━" * 40)),
    ],
    ids=["empty", "half", "half-a-cell", "full", "nothing-to-run"],
)
def test_the_progress_bar_fills_forty_cells_in_half_cells(
    completed: int, total: int, done: bool, expected: tuple[str, str]
) -> None:
    pytest.importorskip("rich")
    from rich.text import Text

    from flowing._progress import _append_bar

    bar = Text()
    _append_bar(bar, completed, total, done)
    filled = "".join(bar.plain[s.start : s.end] for s in bar.spans if s.style != "bar.back")
    back = "".join(bar.plain[s.start : s.end] for s in bar.spans if s.style == "bar.back")
    assert (filled, back) == expected
    assert all(s.style == "bar.finished" for s in bar.spans if s.style != "bar.back") or not done


def test_the_rich_display_lines_up_the_running_tasks_and_counts_the_rest() -> None:
    pytest.importorskip("rich")
    now = time.monotonic()
    names = ["a", "ccc"] + [f"task{k}" for k in range(8)]
    started = [TaskStarted(name, i, 20, now, 1, 1) for i, name in enumerate(names)]
    display = RichDisplay(FakeTerminal(), recorded([FlowStarted(total=20, pending=20, time=now), *started]))
    lines = drawn(display, width=60).splitlines()
    assert lines[1].startswith("✓ 0 done   ● 10 running")
    running = [line for line in lines if "▸" in line]
    assert [line.split()[1] for line in running] == ["a", "ccc"] + [f"task{k}" for k in range(6)]
    elapsed_columns = {re.search(r"\d\.\ds", line).start() for line in running}  # type: ignore[union-attr]
    assert len(elapsed_columns) == 1
    assert lines[-1].strip() == "… and 2 more"


def test_the_tally_counts_each_result_once_however_often_it_catches_up() -> None:
    seen = flaky_broken_events()
    recorder = recorded(seen[:5])  # flaky succeeded
    tally = Tally(recorder)
    tally.catch_up()
    for event in seen[5:]:
        recorder(event)
        tally.catch_up()
    tally.catch_up()
    assert tally.counts == {"succeeded": 1, "failed": 1, "skipped": 1, "cancelled": 0}
    assert (tally.finished, tally.pending, tally.retries, tally.running) == (3, 3, 1, {})


def test_the_tally_starts_over_with_a_new_run() -> None:
    seen = flaky_broken_events()
    recorder = recorded(seen)
    tally = Tally(recorder)
    tally.catch_up()
    for event in seen[:5]:  # the next run, up to flaky's success
        recorder(event)
    tally.catch_up()
    assert (tally.counts["succeeded"], tally.counts["failed"], tally.finished) == (1, 0, 1)


def test_a_tally_that_looks_while_the_next_run_starts_sees_nothing_of_the_run_before() -> None:
    """The display's thread may take the interpreter lock between any two steps of the
    event loop's: here it looks after each attribute the recorder sets."""
    seen = flaky_broken_events()
    views: list[tuple[int, int, float | None]] = []

    class Watched(RunRecorder):
        watching = False

        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)
            if self.watching:
                tally.catch_up()
                views.append((tally.counted, tally.pending, tally.finished_at))

    recorder = Watched()
    for event in seen:
        recorder(event)
    tally = Tally(recorder)
    tally.show_next_run()
    recorder.watching = True
    recorder(seen[0])  # the next run's FlowStarted
    assert views and all(view == (0, 0, None) for view in views[:-1])
    assert views[-1] == (0, 3, None)


def test_the_rich_display_prints_failures_as_they_happen() -> None:
    pytest.importorskip("rich")
    terminal = FakeTerminal()
    recorder = RunRecorder()
    display = RichDisplay(terminal, recorder, redraw_s=0.01)
    seen = flaky_broken_events()
    display.start()
    for event in seen:
        recorder(event)
    deadline = time.monotonic() + 10
    while "✗ broken" not in terminal.text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "✗ broken failed: ValueError: bad row" in terminal.text()  # before the display stopped
    display.stop()
    assert recorder.news is None  # kept only while a display shows them
    assert "✗ broken failed: ValueError: bad row" in terminal.text()


@pytest.mark.parametrize("error", [BrokenPipeError, OSError], ids=["broken-pipe", "os-error"])
def test_the_rich_display_stops_printing_news_once_the_terminal_failed(
    error: type[OSError], caplog: pytest.LogCaptureFixture
) -> None:
    """rich itself would answer a broken pipe with SystemExit, and stdout sent to /dev/null."""
    pytest.importorskip("rich")

    class DeadTerminal(FakeTerminal):
        writes = 0

        def write(self, text: str) -> int:
            DeadTerminal.writes += 1
            raise error("terminal gone")

    recorder = RunRecorder()
    display = RichDisplay(DeadTerminal(), recorder)
    recorder.news = deque()
    with caplog.at_level(logging.WARNING, logger="flowing"):
        for event in flaky_broken_events() * 2:  # a retry and a failure each time: four pieces of news
            recorder(event)
        display.print_news()
    assert DeadTerminal.writes == 1
    assert caplog.text.count("the progress display failed and is off") == 1


class DyingTerminal(FakeTerminal):
    """A terminal that raises ``error`` on every write once ``dead`` is set."""

    def __init__(self, dead: bool, error: OSError) -> None:
        super().__init__()
        self.dead = dead
        self.error = error
        self.failed = threading.Event()  # a write failed

    def write(self, text: str) -> int:
        if self.dead:
            self.failed.set()
            raise self.error
        return super().write(text)


@pytest.mark.parametrize(
    "error",
    [OSError(5, "Input/output error"), BrokenPipeError(32, "Broken pipe")],
    ids=["hung-up", "broken-pipe"],
)
@pytest.mark.parametrize("dies", ["before-the-run", "during-the-run"])
def test_a_rich_display_whose_terminal_fails_says_so_once_and_the_run_goes_on(
    dies: str, error: OSError, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("rich")
    terminal = DyingTerminal(dead=dies == "before-the-run", error=error)

    @task
    def hang_up() -> int:
        terminal.dead = True
        assert terminal.failed.wait(10)  # the display tried to write: it knows now
        return 1

    @task(depends_on=[hang_up], retry=1, retry_backoff_base_ms=0)
    def broken(hang_up: int) -> int:
        raise ValueError("bad row")  # a retry and a failure: news to print

    flow = Flow(broken)
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.WARNING, logger="flowing"):
        results = flow.run(progress=True)
    assert sys.stderr is terminal  # given back
    assert {name: r.state for name, r in results.items()} == {
        "hang_up": StepState.SUCCEEDED,
        "broken": StepState.FAILED,
    }
    assert caplog.text.count("the progress display failed and is off") == 1
    assert type(error).__name__ in caplog.text
    assert flow._recorder.news is None  # no news kept for a display that is gone


def test_a_rich_display_that_cannot_start_its_thread_gives_the_terminal_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("rich")

    class NoThreads(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    @task
    async def load() -> int:  # an async task: the run itself needs no thread
        return 1

    terminal = FakeTerminal()
    flow = Flow(load)
    monkeypatch.setattr(threading, "Thread", NoThreads)
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.WARNING, logger="flowing"):
        results = flow.run(progress=True)
    assert sys.stderr is terminal  # rich's Live had redirected it: it is given back
    assert terminal.getvalue().endswith("\x1b[?25h")  # the cursor shown again
    assert caplog.text.count("the progress display failed and is off: RuntimeError") == 1
    assert results["load"].state is StepState.SUCCEEDED
    assert flow._recorder.news is None


@pytest.mark.parametrize(
    "finished,pending,elapsed,expected",
    [(0, 10, 5.0, None), (5, 10, 5.0, 5.0), (10, 10, 5.0, 0.0)],
    ids=["nothing-finished", "half-way", "all-finished"],
)
def test_the_eta_extrapolates_the_average_pace(
    finished: int, pending: int, elapsed: float, expected: float | None
) -> None:
    tally = Tally(RunRecorder())
    tally.started_at, tally.pending = 100.0, pending
    tally.counted = finished
    assert tally.eta(now=100.0 + elapsed) == expected


def test_plain_lines_are_written_soon_without_waiting_for_more_events() -> None:
    out = io.StringIO()
    display = PlainDisplay(out, flush_s=0.01)
    seen = flaky_broken_events()
    display.start()
    display.on_event(seen[0])
    deadline = time.monotonic() + 10
    while not out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert out.getvalue().count("\n") == 1
    display.stop()


def test_tasks_replayed_from_a_journal_are_counted_apart_from_the_pending_ones() -> None:
    replayed = StepResult("a", StepState.SUCCEEDED, reason="replayed from the journal", cached=True)
    ran = StepResult("b", StepState.SUCCEEDED, attempts=1, started_at=1.0, finished_at=2.0)
    events: list[Event] = [
        FlowStarted(total=2, pending=1, time=0.0),
        TaskFinished("a", 0, 2, 0.1, replayed),
        TaskFinished("b", 1, 2, 0.2, ran),
    ]
    tally = Tally(recorded(events))
    tally.catch_up()
    assert (tally.finished, tally.cached, tally.pending, tally.counts["succeeded"]) == (1, 1, 1, 2)


def load_then_report(**load_options: Any) -> tuple[Flow, TaskDef[..., int]]:
    """A flow of two tasks, ``report`` taking ``load``'s value; ``load`` is returned too."""

    @task(**load_options)
    def load() -> int:
        return 1

    @task(depends_on=[load])
    def report(load: int) -> int:
        return load

    return Flow(report), load


def test_a_cache_hit_is_one_of_the_pending_tasks_and_counts_as_finished() -> None:
    flow, _ = load_then_report(cache=True)
    flow.run()
    flow.run()  # load is a hit on its code and inputs: it still was one of the 2 to run
    assert flow.results["load"].cached
    tally = Tally(flow._recorder)
    tally.catch_up()
    assert (tally.finished, tally.pending, tally.counts["succeeded"]) == (2, 2, 2)


def test_the_tally_of_an_ended_run_counts_only_its_own_results_when_the_flow_kept_others() -> None:
    flow, load = load_then_report()
    flow.override(load, 5)  # kept: a result of the flow, none of the run's
    flow.run()
    tally = Tally(flow._recorder)
    tally.catch_up()
    assert (tally.finished, tally.pending, tally.counts["succeeded"]) == (1, 1, 1)


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_the_summary_lists_every_task_and_ends_with_the_verdict(terminal: bool) -> None:
    pytest.importorskip("rich")
    from flowing._progress import print_summary

    flow = flaky_broken_report()
    flow.run()
    out = FakeTerminal() if terminal else io.StringIO()
    print_summary(flow.results.values(), "FAILED: 1 succeeded, 1 failed, 1 skipped", out)
    text = out.text() if isinstance(out, FakeTerminal) else out.getvalue()
    for row in ("SUCCEEDED flaky", "FAILED broken", "ValueError: bad row", "SKIPPED report"):
        assert row in " ".join(text.split())
    assert text.rstrip().endswith("FAILED: 1 succeeded, 1 failed, 1 skipped")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_progress_that_cannot_be_written_is_logged_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    with caplog.at_level(logging.WARNING, logger="flowing"):
        results = flaky_broken_report().run(progress=True, backend=backend)  # type: ignore[arg-type]
    assert results["flaky"].state is StepState.SUCCEEDED
    assert "the progress display failed and is off: BrokenPipeError" in caplog.text
