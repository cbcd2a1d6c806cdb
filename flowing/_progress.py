"""Live progress on stderr: a rich display on a terminal, plain lines elsewhere.

On a terminal with ``rich`` installed (``pip install 'flowing[cli]'``) it is a live
display: counts, a bar with an ETA, the running tasks with their elapsed time,
and a line above it for each retry and failure. Otherwise (stderr not a TTY, or
no rich) it prints one plain line per event. Either way it only reads what the
event stream tells: it never changes a result.

A display costs the run little. The rich display listens to no event: four times
a second its own thread reads the run's recorder (see ``_recorder``), which the
flow keeps anyway, and counts the results finished since it last looked with
C-level calls. Plain lines cost more to format: the event loop only appends each
event to the display's queue (a C call, no Python frame), and the display's own
thread formats and writes them in batches, ten times a second and at the end.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from operator import attrgetter, countOf
from typing import Any, Protocol, TextIO

from ._events import (
    Event,
    FlowStarted,
    InstanceFinished,
    TaskFinished,
    TaskRetrying,
    TaskStarted,
    ThreadAbandoned,
    retry_cause,
)
from ._recorder import RunRecorder
from ._results import (
    REPLAYED_REASON,
    StepResult,
    StepState,
    describe_error,
    describe_outcome,
    format_summary,
)
from ._stream import Broadcaster

_MAX_RUNNING_SHOWN = 8


class Display(Protocol):
    """A progress display, started and stopped around a run. ``on_event`` receives
    the events; None: the display reads the run's recorder instead."""

    @property
    def on_event(self) -> Callable[[Event], None] | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@contextmanager
def showing_progress(events: Broadcaster, recorder: RunRecorder, enabled: bool) -> Iterator[None]:
    """Show progress of the runs inside the block when ``enabled``."""
    if not enabled:
        yield
        return
    display = make_display(sys.stderr, recorder)
    try:
        display.start()
    except Exception as error:  # e.g. stderr is closed: the run goes on without progress
        _display_failed(error)
        yield
        return
    listener = display.on_event
    try:
        with events.listening(listener, "progress display", guard=False) if listener else nullcontext():
            yield
    finally:
        try:
            display.stop()
        except Exception as error:  # never hide the run's own outcome
            _display_failed(error)


def _display_failed(error: Exception) -> None:
    from ._log import logger

    logger.warning("the progress display failed and is off: %r", error)


def make_display(file: TextIO, recorder: RunRecorder) -> Display:
    """The rich live display on a terminal when rich is installed, else plain lines."""
    if is_terminal(file):
        try:
            return RichDisplay(file, recorder)
        except ImportError:
            pass
    return PlainDisplay(file)


def is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def counts_toward_pending(result: StepResult) -> bool:
    """A finished task was one of the run's ``pending`` ones: all but replays from a journal
    (a cache hit on its code and inputs was one)."""
    return not (result.cached and result.reason == REPLAYED_REASON)


_STATE_VALUE = attrgetter("state._value_")
_CACHED = attrgetter("cached")
_REASON = attrgetter("reason")


class Tally:
    """What the live display shows of its run, taken from the run's recorder when it draws.

    ``catch_up`` counts the results finished since it last looked with C-level calls
    (no Python call per result) and copies what runs now: each copy is one step
    under the interpreter lock, while the event loop goes on updating the recorder.
    Until the recorder has seen run number ``first_run``, it shows nothing.
    """

    def __init__(self, recorder: RunRecorder) -> None:
        self.recorder = recorder
        self.first_run = recorder.runs
        self._counting: dict[int, StepResult] | None = None  # the results of the run counted
        self._reset()

    def _reset(self) -> None:
        # Invariant: `counted` results of `_counting` are in `states` (by state value),
        # `cached` (replayed or cache hits) and `replayed` (replays from a journal).
        self.counted = 0
        self.states: Counter[str] = Counter()
        self.cached = 0
        self.replayed = 0
        self.retries = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.pending = 0
        self.running: dict[str, float] = {}
        self.attempts: dict[str, tuple[int, int, float | None]] = {}

    def show_next_run(self) -> None:
        """Show the run that starts next, not the recorder's latest one."""
        self.first_run = self.recorder.runs + 1
        self._counting = None
        self._reset()

    def catch_up(self) -> None:
        """Take in what the recorder has seen since the last call."""
        recorder = self.recorder
        if recorder.runs < self.first_run:
            return
        finished = recorder.finished
        if finished is not self._counting:  # a new run
            self._counting = finished
            self._reset()
        new = list(finished.values())[self.counted :]
        self.counted += len(new)
        counts = recorder.counts
        if counts is not None and sum(counts.values()) == self.counted:
            # The ended run's own count, and the flow holds no result but the run's:
            # no need to count them one by one (10,000 results: about 0.5 ms).
            self.states = Counter(counts)
        else:
            self.states.update(map(_STATE_VALUE, new))
        cached = list(itertools.compress(new, map(_CACHED, new)))
        self.cached += len(cached)
        self.replayed += countOf(map(_REASON, cached), REPLAYED_REASON)
        self.retries = sum(map(len, list(recorder.retries.values())))
        self.started_at, self.finished_at = recorder.started, recorder.ended
        self.pending = recorder.pending
        self.running, self.attempts = dict(recorder.running), dict(recorder.attempts)

    @property
    def finished(self) -> int:
        """How many of the ``pending`` tasks finished."""
        return self.counted - self.replayed

    @property
    def counts(self) -> dict[str, int]:
        """Finished tasks by state value (``"succeeded"``, ...)."""
        return {state.value: self.states[state.value] for state in StepState}

    def elapsed(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        end = self.finished_at if self.finished_at is not None else now
        return end - (self.started_at if self.started_at is not None else now)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the average pace so far; None before the first task finishes."""
        if self.finished_at is not None:
            return 0.0
        done = self.finished
        if done == 0:
            return None
        return self.elapsed(now) / done * max(self.pending - done, 0)


class PlainDisplay:
    """One line per event, for logs and pipes: ``[ 3/12]   0.41s  ok       load  102.3 ms``.

    The event loop only appends each event to a queue; the display's own thread
    formats and writes the queued events every ``flush_s`` and at ``stop``, so a
    10,000-task run pays neither the formatting on the loop nor a system call per
    event. Invariant: every queued event is taken exactly once, in order, by
    ``catch_up`` (one batch at a time, under ``_lock``), and written unless the
    file failed before; ``finished`` counts the pending tasks finished by then.
    """

    def __init__(self, file: TextIO, flush_s: float = 0.1) -> None:
        self.file = file
        self.flush_s = flush_s
        self.started_at = time.monotonic()
        self.pending = self.finished = 0
        self._queue: deque[Event] = deque()
        self.on_event: Callable[[Event], None] = self._queue.append  # cannot raise
        self._lock = threading.Lock()
        self._broken = False  # the file could not be written: drop the events
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._keep_up, name="flowing progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.catch_up()

    def catch_up(self) -> None:
        """Write a line for every queued event now.

        When the file cannot be written (a closed pipe, say), progress is off for the
        rest of the run: the failure is logged once and later events are dropped.
        """
        with self._lock:
            batch = []
            while self._queue:
                batch.append(self._queue.popleft())
            if not batch or self._broken:
                return
            try:
                lines = []
                for event in batch:
                    self._count(event)
                    lines.append(self.describe(event) + "\n")
                self.file.write("".join(lines))
                self.file.flush()
            except Exception as error:
                self._broken = True
                _display_failed(error)

    def _count(self, event: Event) -> None:
        if isinstance(event, TaskFinished):
            self.finished += counts_toward_pending(event.result)
        elif isinstance(event, FlowStarted):
            self.started_at, self.pending, self.finished = event.time, event.pending, 0

    def _keep_up(self) -> None:
        while not self._stopping.wait(self.flush_s):
            self.catch_up()

    def describe(self, event: Event) -> str:
        """The line for ``event``, just after it was counted."""
        clock = "[%*d/%d] %7.2fs" % (
            len(str(self.pending)), self.finished, self.pending, event.time - self.started_at
        )
        if isinstance(event, TaskStarted):
            if event.max_attempts == 1:
                return f"{clock}  start      {event.task}"
            return f"{clock}  start      {event.task}  attempt {event.attempt}/{event.max_attempts}"
        if isinstance(event, (TaskFinished, InstanceFinished)):
            return f"{clock}  {_state_word(event.result):<9}  {event.task}{_outcome(event.result)}"
        if isinstance(event, TaskRetrying):
            why = retry_cause(event)
            return (
                f"{clock}  retry      {event.task}  attempt {event.attempt}/{event.max_attempts} "
                f"failed ({why}); next in {event.delay_ms:.0f} ms"
            )
        if isinstance(event, ThreadAbandoned):
            return (
                f"{clock}  abandoned  {event.task}  sync body abandoned (timed out or "
                f"cancelled), its thread runs on"
            )
        if isinstance(event, FlowStarted):
            return f"{clock}  flow       started: {event.pending} of {event.total} tasks to run"
        return f"{clock}  flow       finished in {event.duration_ms / 1000:.2f} s: {_counts(event.counts)}"


_STATE_WORDS = {
    StepState.SUCCEEDED: "ok",
    StepState.FAILED: "FAILED",
    StepState.SKIPPED: "skipped",
    StepState.CANCELLED: "cancelled",
}


def _state_word(result: StepResult) -> str:
    return _STATE_WORDS[result.state] if not result.cached else "cached"


def _outcome(result: StepResult) -> str:
    if result.error is not None:
        return f"  {describe_error(result.error)}"
    if result.attempts == 1 and result.state is StepState.SUCCEEDED:
        return f"  {result.duration_ms:.1f} ms"  # most lines of a long run
    timing = f"  {result.duration_ms:.1f} ms" if result.attempts else ""
    attempts = f" after {result.attempts} attempts" if result.attempts > 1 else ""
    reason = f"  ({result.reason})" if result.reason and not result.succeeded else ""
    return f"{timing}{attempts}{reason}"


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{n} {state}" for state, n in counts.items() if n]
    return ", ".join(shown) or "nothing to run"


class RichDisplay:
    """A rich ``Live`` display on stderr, redrawn four times a second by its own thread.

    It listens to no event: each redraw reads the run's recorder (see ``Tally``), so
    the run pays no Python call per event for it. Each retry, failure and abandoned
    thread, which the recorder keeps as news while the display runs, prints its
    line above the display at the next redraw. When the terminal fails (a closed
    pipe, a hung-up terminal), the display goes quiet for the rest of the run and
    the log says so once.
    """

    on_event = None  # it reads the recorder

    def __init__(self, file: TextIO, recorder: RunRecorder, redraw_s: float = 0.25) -> None:
        import rich.live  # noqa: F401  (ImportError without rich: make_display's cue)

        self.recorder = recorder
        self.tally = Tally(recorder)
        self.console = _console(file)
        self.live: Any = None  # made by start(): a Live draws once when it is made
        self.redraw_s = redraw_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.tally.show_next_run()
        self.recorder.news = deque()
        try:
            from rich.live import Live

            self.live = Live(
                get_renderable=self.render,
                console=self.console,
                auto_refresh=False,
                transient=False,
                redirect_stdout=False,
            )
            self.live.start()
            self._stopping.clear()
            self._thread = threading.Thread(target=self._keep_drawing, name="flowing progress", daemon=True)
            self._thread.start()
        except BaseException as error:  # no display: keep no news, give stderr back
            self.recorder.news = None
            if isinstance(error, OSError):
                self.console.quiet = True  # a dead terminal: write to it no more
            if self.live is not None:
                with suppress(Exception):
                    self.live.stop()  # also shows the cursor again
            raise

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.print_news()
            if self.live is not None:
                self.live.stop()  # draws the last screen (unless the terminal failed)
        except Exception as error:
            self.console.fail(error)
        finally:
            self.recorder.news = None

    def _keep_drawing(self) -> None:
        """Redraw until ``stop``; once the terminal failed, only drop the news."""
        while not self._stopping.wait(self.redraw_s):
            self.print_news()
            if not self.console.quiet:
                try:
                    self.live.refresh()
                except Exception as error:  # a dead terminal must not break the run
                    self.console.fail(error)

    def print_news(self) -> None:
        """A line above the display for each retry, failure and abandoned thread since the
        last call; once the terminal failed, the news is dropped unprinted."""
        news = self.recorder.news
        while news:
            event = news.popleft()
            if self.console.quiet:
                continue
            try:
                self._print_news(event)
            except Exception as error:  # a dead terminal must not break the run
                self.console.fail(error)

    def _print_news(self, event: Event) -> None:
        """A line above the display for each retry, failure and abandoned thread."""
        if isinstance(event, TaskRetrying):
            why = retry_cause(event)
            self.console.print(
                f"[yellow]↻ {_escape(event.task)}[/] attempt {event.attempt}/{event.max_attempts} "
                f"failed: {_escape(why)} [dim](retry in {event.delay_ms:.0f} ms)[/]"
            )
        elif isinstance(event, TaskFinished) and event.result.state is StepState.FAILED:
            detail = describe_outcome(event.result)
            self.console.print(f"[bold red]✗ {_escape(event.task)}[/] failed: {_escape(detail)}")
        elif isinstance(event, ThreadAbandoned):
            self.console.print(
                f"[yellow]! {_escape(event.task)}[/]: sync body abandoned, its thread runs on"
            )

    def render(self) -> Any:
        """The display as one ``Text``: rich lays it out in a fraction of a table's time,
        and a redraw holds the interpreter lock that the run needs."""
        from rich.cells import cell_len
        from rich.text import Text

        now = time.monotonic()
        tally = self.tally
        tally.catch_up()
        counts = tally.counts
        running, attempts = tally.running, tally.attempts
        finished, pending, retries = tally.finished, tally.pending, tally.retries
        elapsed, eta = tally.elapsed(now), tally.eta(now)
        screen = Text(no_wrap=True, overflow="ellipsis")
        _append_bar(screen, finished, pending, done=tally.finished_at is not None)
        screen.append(f" {finished}/{pending}", style="bold")
        screen.append(f"  {_clock(elapsed)}  ETA {_clock(eta) if eta is not None else '?'}\n", style="dim")
        cached = f" ({tally.cached} cached)" if tally.cached else ""
        screen.append(f"✓ {counts['succeeded']} done{cached}", style="green")
        screen.append(f"   ● {len(running)} running", style="cyan")
        screen.append(f"   ✗ {counts['failed']} failed", style="red" if counts["failed"] else "dim")
        screen.append(f"   ⤼ {counts['skipped']} skipped", style="yellow" if counts["skipped"] else "dim")
        screen.append(f"   ↻ {retries} retries", style="yellow" if retries else "dim")
        if counts["cancelled"]:
            screen.append(f"   ⊘ {counts['cancelled']} cancelled", style="magenta")
        shown = list(itertools.islice(running.items(), _MAX_RUNNING_SHOWN))
        width = max((cell_len(name) for name, _ in shown), default=0)
        for name, first in shown:
            screen.append(f"\n  ▸ {name}{' ' * (width - cell_len(name))}", style="cyan")
            screen.append(f"  {now - first:5.1f}s")
            screen.append(_tries(attempts.get(name), now), style="yellow")
        if len(running) > _MAX_RUNNING_SHOWN:
            screen.append(f"\n    … and {len(running) - _MAX_RUNNING_SHOWN} more", style="dim")
        return screen


_BAR_WIDTH = 40


def _append_bar(text: Any, completed: int, total: int, done: bool) -> None:
    """A progress bar drawn as rich's ``ProgressBar`` draws it, in half cells."""
    halves = _BAR_WIDTH * 2 * min(completed, total) // max(total, 1)
    full, half = divmod(halves, 2)
    style = "bar.finished" if done or full == _BAR_WIDTH else "bar.complete"
    text.append("━" * full + "╸" * half, style=style)
    rest = _BAR_WIDTH - full - half
    if rest:
        text.append(("╺" if full and not half else "━") + "━" * (rest - 1), style="bar.back")


def _tries(attempts: tuple[int, int, float | None] | None, now: float) -> str:
    if attempts is None:
        return ""
    attempt, max_attempts, retry_at = attempts
    if retry_at is None:
        return f"  attempt {attempt}/{max_attempts}"
    return f"  attempt {attempt}/{max_attempts} failed, retry in {max(retry_at - now, 0):.1f}s"


def _console(file: TextIO) -> Any:
    """A rich console on ``file`` that goes quiet for good when writing fails.

    ``fail(error)`` makes it quiet and logs why, once however often it is called.
    rich's own answer to a broken pipe is to point the process's stdout at /dev/null
    and raise SystemExit: a library's display must not end the run or take stdout.
    """
    from rich.console import Console

    class QuietOnFailure(Console):
        def fail(self, error: Exception) -> None:
            if not self.quiet:
                self.quiet = True
                _display_failed(error)

        def on_broken_pipe(self) -> None:
            self.fail(BrokenPipeError(f"cannot write to {file!r}"))

    return QuietOnFailure(file=file, highlight=False)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(seconds, 0.0), 60)
    return f"{int(minutes)}:{secs:04.1f}"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_summary(results: Iterable[StepResult], verdict: str, file: TextIO) -> None:
    """The results table and a verdict line: coloured with rich on a terminal, else plain."""
    if is_terminal(file):
        try:
            _print_rich_summary(list(results), verdict, file)
            return
        except ImportError:
            pass
    file.write(format_summary(results) + "\n" + verdict + "\n")


_STATE_STYLES = {"succeeded": "green", "failed": "bold red", "skipped": "yellow", "cancelled": "magenta"}


def _print_rich_summary(results: list[StepResult], verdict: str, file: TextIO) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold dim")
    for column in ("state", "task", "duration", "attempts", "", "error / reason"):
        table.add_column(column, justify="right" if column in ("duration", "attempts") else "left")
    for r in results:
        state = "cached" if r.cached and r.succeeded else r.state.value
        style = "blue" if state == "cached" else _STATE_STYLES[r.state.value]
        table.add_row(
            f"[{style}]{state.upper()}[/]",
            _escape(r.name),
            f"{r.duration_ms:.1f} ms" if r.started_at is not None and not r.cached else "",
            str(r.attempts) if r.attempts else "",
            "[dim]detached[/]" if r.detached else "",
            _escape(describe_outcome(r)),
        )
    console = _console(file)
    console.print(table)
    ok = verdict.startswith("ok")
    console.print(f"[{'bold green' if ok else 'bold red'}]{_escape(verdict)}[/]")
