"""Live progress on stderr, built on the event stream.

On a terminal with ``rich`` installed (``pip install 'flowing[cli]'``) it is a live
display: counts, a bar with an ETA, the running tasks with their elapsed time,
and a line above it for each retry and failure as it happens. Otherwise (stderr
not a TTY, or no rich) it prints one plain line per event. Either way it only
reads events: it never changes a result.

A display costs the run little. The rich display updates its tally on the event
loop (a fraction of a microsecond per event) and redraws from rich's own thread.
Plain lines cost more to format: the event loop only appends each event to the
display's queue (a C call, no Python frame), and the display's own thread formats
and writes them in batches, ten times a second and at the end.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from ._events import (
    Event,
    FlowFinished,
    FlowStarted,
    InstanceFinished,
    TaskFinished,
    TaskRetrying,
    TaskStarted,
    ThreadAbandoned,
    retry_cause,
)
from ._results import (
    FAILED,
    REPLAYED_REASON,
    SUCCEEDED,
    StepResult,
    StepState,
    describe_error,
    describe_outcome,
    format_summary,
)
from ._stream import Broadcaster

_MAX_RUNNING_SHOWN = 8


class Display(Protocol):
    """A progress display: ``on_event`` receives the events; started and stopped around a run."""

    def on_event(self, event: Event) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@contextmanager
def showing_progress(events: Broadcaster, enabled: bool) -> Iterator[None]:
    """Show progress of the runs inside the block when ``enabled``."""
    if not enabled:
        yield
        return
    display = make_display(sys.stderr)
    try:
        display.start()
    except Exception as error:  # e.g. stderr is closed: the run goes on without progress
        _display_failed(error)
        yield
        return
    try:
        with events.listening(display.on_event, "progress display", guard=False):
            yield
    finally:
        try:
            display.stop()
        except Exception as error:  # never hide the run's own outcome
            _display_failed(error)


def _display_failed(error: Exception) -> None:
    from ._log import logger

    logger.warning("the progress display failed and is off: %r", error)


def make_display(file: TextIO) -> Display:
    """The rich live display on a terminal when rich is installed, else plain lines."""
    if is_terminal(file):
        try:
            return RichDisplay(file)
        except ImportError:
            pass
    return PlainDisplay(file)


def is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class Tally:
    """Counts and running tasks, updated from events; read by a display.

    ``on_news`` (if given) is called with each failure, retry and abandoned thread,
    from ``update``: a display that tallies on the event loop can then take ``update``
    itself as its listener, one Python call per event.
    """

    def __init__(self, on_news: Callable[[Event], None] | None = None) -> None:
        self.on_news = on_news
        self._reset(time.monotonic(), 0)

    def _reset(self, started_at: float, pending: int) -> None:
        # Invariant: `running` maps each task with a started, unfinished attempt to its
        # first start time, in the order of their first start (a float: no object for
        # the garbage collector per running task); `attempts` maps those of them that
        # may take more than one attempt to (attempt, max attempts, next retry time or
        # None while an attempt runs). `succeeded` plus `by_state` count every finished
        # task: the common case, a task that ran and succeeded, in `succeeded` (no enum
        # hashing on the event loop), every other one in `by_state`. `finished` counts
        # those of the `pending` ones (all but the replays from a journal), `cached`
        # those replayed or hits of the cache.
        self.started_at = started_at
        self.pending = pending
        self.width = len(str(pending))
        self.succeeded = 0
        self.by_state = dict.fromkeys(StepState, 0)
        self.retries = 0
        self.finished = 0
        self.cached = 0
        self.running: dict[str, float] = {}
        self.attempts: dict[str, tuple[int, int, float | None]] = {}
        self.finished_at: float | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Finished tasks by state value (``"succeeded"``, ...)."""
        counts = {state.value: n for state, n in dict(self.by_state).items()}
        counts[SUCCEEDED.value] += self.succeeded
        return counts

    def update(self, event: Event) -> None:
        """Apply one event. The rich display does it on the event loop while rich's
        thread renders from copies of these dicts (a copy is one step under the GIL);
        the plain display applies and reads them in its own thread. By the event's
        type, the two events every task has handled inline: they add up."""
        if type(event) is TaskStarted and event.max_attempts == 1:
            self.running[event.task] = event.time
        elif type(event) is TaskFinished:
            self.running.pop(event.task, None)
            result = event.result
            if result.state is SUCCEEDED and not result.cached:
                self.succeeded += 1
                self.finished += 1
            else:
                self._finished_otherwise(event)
            if self.attempts:
                self.attempts.pop(event.task, None)
        else:
            apply = _OTHER_UPDATES.get(type(event))
            if apply is not None:
                apply(self, event)

    def _finished_otherwise(self, event: TaskFinished) -> None:
        """A task that failed, was skipped or cancelled, or came from a journal or cache."""
        result = event.result
        self.by_state[result.state] += 1
        if not result.cached:
            self.finished += 1
        else:
            self.cached += 1
            if result.reason != REPLAYED_REASON:  # a replay is not part of `pending`
                self.finished += 1  # a cache hit is
        if result.state is FAILED:
            self._news(event)

    def _started(self, event: TaskStarted) -> None:
        """An attempt of a task that may take more than one."""
        self.running.setdefault(event.task, event.time)
        self.attempts[event.task] = (event.attempt, event.max_attempts, None)

    def _instance_finished(self, event: InstanceFinished) -> None:
        self.running.pop(event.task, None)  # mapped instances count with their step
        self.attempts.pop(event.task, None)

    def _retrying(self, event: TaskRetrying) -> None:
        self.retries += 1
        self.running.setdefault(event.task, event.time)
        retry_at = event.time + event.delay_ms / 1000
        self.attempts[event.task] = (event.attempt, event.max_attempts, retry_at)
        self._news(event)

    def _abandoned(self, event: ThreadAbandoned) -> None:
        self._news(event)

    def _news(self, event: Event) -> None:
        if self.on_news is not None:
            self.on_news(event)

    def _flow_started(self, event: FlowStarted) -> None:
        self._reset(event.time, event.pending)

    def _flow_finished(self, event: FlowFinished) -> None:
        self.finished_at = event.time
        # A cancelled run finishes its mapped steps without an InstanceFinished for
        # their running instances: none of them runs on once the run is over.
        self.running, self.attempts = {}, {}

    def elapsed(self, now: float | None = None) -> float:
        end = self.finished_at if self.finished_at is not None else (now or time.monotonic())
        return end - self.started_at

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the average pace so far; None before the first task finishes."""
        if self.finished_at is not None:
            return 0.0
        done = self.finished
        if done == 0:
            return None
        return self.elapsed(now) / done * max(self.pending - done, 0)


_OTHER_UPDATES: dict[type, Callable[[Tally, Any], None]] = {
    TaskStarted: Tally._started,
    InstanceFinished: Tally._instance_finished,
    TaskRetrying: Tally._retrying,
    ThreadAbandoned: Tally._abandoned,
    FlowStarted: Tally._flow_started,
    FlowFinished: Tally._flow_finished,
}


class PlainDisplay:
    """One line per event, for logs and pipes: ``[ 3/12]   0.41s  ok       load  102.3 ms``.

    The event loop only appends each event to a queue; the display's own thread
    formats and writes the queued events every ``flush_s`` and at ``stop``, so a
    10,000-task run pays neither the formatting on the loop nor a system call per
    event. Invariant: every queued event is taken exactly once, in order, by
    ``catch_up`` (one batch at a time, under ``_lock``), and written unless the
    file failed before.
    """

    def __init__(self, file: TextIO, flush_s: float = 0.1) -> None:
        self.file = file
        self.tally = Tally()
        self.flush_s = flush_s
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
                    self.tally.update(event)
                    lines.append(self.describe(event) + "\n")
                self.file.write("".join(lines))
                self.file.flush()
            except Exception as error:
                self._broken = True
                _display_failed(error)

    def _keep_up(self) -> None:
        while not self._stopping.wait(self.flush_s):
            self.catch_up()

    def describe(self, event: Event) -> str:
        """The line for ``event``, just after the tally took it in."""
        tally = self.tally
        clock = "[%*d/%d] %7.2fs" % (
            tally.width, tally.finished, tally.pending, event.time - tally.started_at
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
    """A rich ``Live`` display on stderr, redrawn four times a second from rich's thread.

    The tally's ``update`` is the listener: each event updates it on the event loop
    (a fraction of a microsecond, and the event can be freed at once: queuing
    thousands of them for a display thread made the garbage collector work harder
    than the tally ever did). A retry, failure or abandoned thread, news the tally
    hands on, also prints its line at once.
    """

    def __init__(self, file: TextIO) -> None:
        from rich.live import Live

        self.tally = Tally(on_news=self._news)
        self.on_event: Callable[[Event], None] = self.tally.update
        self.console = _console(file)
        self.live = Live(
            get_renderable=self.render,
            console=self.console,
            refresh_per_second=4,
            transient=False,
            redirect_stdout=False,
        )

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def _news(self, event: Event) -> None:
        try:
            self._print_news(event)
        except Exception as error:  # a dead terminal must not break the run
            self.tally.on_news = None  # nor be written to again, nor logged once per event
            _display_failed(error)

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
        counts = tally.counts
        # Copies, each one step under the GIL: the loop may update them meanwhile.
        running, attempts = dict(tally.running), dict(tally.attempts)
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
    """A rich console on ``file`` that goes quiet when its pipe breaks.

    rich's own answer to a broken pipe is to point the process's stdout at /dev/null
    and raise SystemExit: a library's display must not end the run or take stdout.
    """
    from rich.console import Console

    class QuietOnBrokenPipe(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            _display_failed(BrokenPipeError(f"cannot write to {file!r}"))

    return QuietOnBrokenPipe(file=file, highlight=False)


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
