"""Ctrl-C during ``flow.run()``, in a real process sent a real SIGINT.

The run behaves as if cancelled from outside (async bodies cancelled, sync threads
abandoned, the rest recorded CANCELLED), then KeyboardInterrupt propagates, and
the journal stays valid for the next process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")

CHILD = textwrap.dedent(
    """
    import json, sys, threading
    import anyio
    from flowing import Flow, task

    backend, journal_path, mode = sys.argv[1:]
    blocking = mode != "replay"
    release = threading.Event()
    sync_started = threading.Event()
    async_started = threading.Event()
    ran = []

    @task
    def quick():
        ran.append("quick")
        return 1

    @task(depends_on=[quick])
    def stalled_sync(quick):
        ran.append("stalled_sync")
        sync_started.set()
        if blocking:
            release.wait(30)
        return 2

    @task(depends_on=[quick])
    async def stalled_async(quick):
        ran.append("stalled_async")
        async_started.set()
        if blocking:
            await anyio.sleep(30)
        return 3

    @task(depends_on=[stalled_sync, stalled_async])
    def last(stalled_sync, stalled_async):
        ran.append("last")
        return stalled_sync + stalled_async

    def announce_when_both_started():
        sync_started.wait()
        async_started.wait()
        print("ready", flush=True)

    flow = Flow(last, journal_path=journal_path)
    if not blocking:
        flow.run(backend=backend)
        print(json.dumps({"ran": sorted(ran), "last": flow.value(last)}), flush=True)
        sys.exit()
    def run_flow():
        if mode == "interrupt-inside-a-loop":  # Jupyter: run() where a loop already runs
            import asyncio, signal

            async def inside_a_loop():
                signal.signal(signal.SIGINT, signal.default_int_handler)  # as IPython does
                flow.run(backend=backend)

            asyncio.run(inside_a_loop())
        else:
            flow.run(backend=backend)

    threading.Thread(target=announce_when_both_started, daemon=True).start()
    try:
        run_flow()
    except KeyboardInterrupt:
        states = {name: r.state.value for name, r in flow.results.items()}
        print(json.dumps(states), flush=True)
        release.set()
        raise
    print("run() returned normally", flush=True)
    """
)

# A run that waited for the sync thread would take 30 s; an interrupt takes milliseconds.
PROMPT_S = 5.0


@pytest.mark.parametrize(
    "mode", ["interrupt", "interrupt-inside-a-loop"], ids=["run", "run-inside-a-running-loop"]
)
def test_ctrl_c_during_run_cancels_the_rest_then_raises_keyboardinterrupt(
    anyio_backend: str, mode: str, tmp_path: Path
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    journal = tmp_path / "journal.jsonl"
    child = subprocess.Popen(
        [sys.executable, str(script), anyio_backend, str(journal), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        report = child.stdout.readline()
        elapsed = time.monotonic() - sent
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()

    assert json.loads(report) == {
        "quick": "succeeded",
        "stalled_sync": "cancelled",
        "stalled_async": "cancelled",
        "last": "cancelled",
    }
    assert elapsed < PROMPT_S
    assert child.returncode == -signal.SIGINT
    assert stderr.rstrip().endswith("KeyboardInterrupt")

    if mode != "interrupt":
        return
    # The journal stays valid: a later process replays what finished, runs the rest.
    assert [json.loads(line)["task"] for line in journal.read_text().splitlines()] == ["quick"]
    replay = subprocess.run(
        [sys.executable, str(script), anyio_backend, str(journal), "replay"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(replay.stdout) == {
        "ran": ["last", "stalled_async", "stalled_sync"],
        "last": 5,
    }


IMPORTS_CHILD = textwrap.dedent(
    """
    import json, sys

    def loop_running():  # the modules may be half imported: look up with getattr
        running_loop = getattr(sys.modules.get("asyncio"), "_get_running_loop", None)
        if running_loop is not None and running_loop() is not None:
            return True
        in_trio_run = getattr(getattr(sys.modules.get("trio"), "lowlevel", None), "in_trio_run", None)
        return in_trio_run is not None and in_trio_run()

    imported, watching = [], []

    def record(event, args):
        if event == "import" and (watching or loop_running()):
            imported.append(args[0])

    sys.addaudithook(record)
    from flowing import Flow, FlowFinished, FlowStarted, task

    def watch(event):
        if isinstance(event, (FlowStarted, FlowFinished)):
            watching[:] = [True] if isinstance(event, FlowStarted) else []

    @task
    def first():
        return 1

    @task(depends_on=[first], cache=True)
    async def second(first):
        return first + 1

    failures = [ValueError("once")]

    @task(depends_on=[first], retry=1, retry_jitter=0.5, retry_backoff_base_ms=1)
    def third(first):  # a jittered retry draws a random number
        if failures:
            raise failures.pop()
        return first + 2

    backend, journal = sys.argv[1:]
    Flow(second, third, journal_path=journal, on_event=watch).run(backend=backend, progress=True)
    print(json.dumps(imported))
    """
)


@pytest.mark.parametrize("terminal", [False, True], ids=["progress-as-lines", "progress-on-a-terminal"])
def test_a_run_imports_nothing_once_its_event_loop_runs(
    anyio_backend: str, terminal: bool, tmp_path: Path
) -> None:
    # A Ctrl-C that lands inside an import can leave it half done (a TypeError from
    # the import machinery on asyncio, a lost signal on trio): run() imports first.
    script = tmp_path / "child.py"
    script.write_text(IMPORTS_CHILD)
    reader, writer = os.openpty() if terminal else os.pipe()  # a terminal: rich's live display
    try:
        done = subprocess.run(
            [sys.executable, str(script), anyio_backend, str(tmp_path / "journal.jsonl")],
            stdout=subprocess.PIPE,
            stderr=writer,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        os.close(reader)
        os.close(writer)
    assert json.loads(done.stdout) == []


def test_a_ctrl_c_during_the_imports_before_a_run_is_raised_once_they_are_done() -> None:
    from flowing._preload import _sigint_held

    finished = False
    with pytest.raises(KeyboardInterrupt):
        with _sigint_held():
            signal.raise_signal(signal.SIGINT)
            finished = True
    assert finished


def test_a_ctrl_c_held_inside_a_trio_run_reaches_trio_as_an_unheld_one_would() -> None:
    # trio's handler defers a KeyboardInterrupt to a checkpoint when the frame it is
    # given is KI-protected, as None is: the signal's own frame must be handed on.
    trio = pytest.importorskip("trio")
    from flowing._preload import _sigint_held

    raised: list[str] = []

    async def main() -> None:
        try:
            with _sigint_held():
                signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raised.append("once the imports are done")
        await trio.lowlevel.checkpoint()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        raised.append("at a later checkpoint")
    assert raised == ["once the imports are done"]
