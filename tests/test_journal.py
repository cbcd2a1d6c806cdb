"""The durable journal: replay across processes, fail closed, crash-safe appends."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flowing import (
    Event,
    Flow,
    FlowDefinitionError,
    FlowStarted,
    InvalidJournalError,
    InvalidKeepError,
    PickleSerializer,
    StepState,
    TaskDef,
    TaskFinished,
    compact_journal,
    task,
)
import flowing._journal
from flowing._journal import Journal, encode_record, read_records

PIPELINE = textwrap.dedent(
    """
    import json, logging, os, sys, time
    import anyio
    from flowing import Flow, task

    logging.basicConfig(level=logging.WARNING)
    journal, log, backend = sys.argv[1:4]
    hold_here = os.environ.get("HOLD") == "1"

    def mark(event):
        with open(log, "a") as f:
            f.write(event + "\\n")

    async def hold(**inputs):
        if hold_here:
            mark("total held")
            await anyio.sleep_forever()

    @task
    def load():
        mark("load")
        return [1, 2, 3]

    @task(depends_on=[load])
    def double(load):
        mark("double")
        return [x * 2 for x in load]

    @task(depends_on=[load])
    def count(load):
        mark("count")
        return len(load)

    @task(depends_on=[double, count], validate=hold)
    def total(double, count):
        mark("total")
        return sum(double) / count

    @task(depends_on=[total])
    def report(total):
        mark("report")
        return f"mean {total}"

    @task(depends_on=[report], detached=True)
    def publish(report):
        mark("publish")
        return "sent " + report

    @task
    def slow():
        if hold_here:
            mark("slow started")
            time.sleep(3600)
        mark("slow")
        return "slow done"

    results = Flow(report, slow, journal_path=journal).run(backend=backend)
    print(json.dumps({n: [r.state.value, r.value, r.cached] for n, r in results.items()}))
    """
)

ALL_TASKS = ["load", "double", "count", "total", "report", "publish", "slow"]


class Pipeline:
    """The script above, run in fresh interpreters against one journal and one side file."""

    def __init__(self, tmp_path: Path, backend: str) -> None:
        self.journal = tmp_path / "run.jsonl"
        self.log = tmp_path / "bodies.log"
        self.script = tmp_path / "pipeline.py"
        self.backend = backend
        self.source = PIPELINE

    def edit(self, old: str, new: str) -> None:
        assert old in self.source
        self.source = self.source.replace(old, new)

    def command(self) -> list[str]:
        self.script.write_text(self.source)
        return [sys.executable, str(self.script), str(self.journal), str(self.log), self.backend]

    def run(self) -> dict[str, list[Any]]:
        done = subprocess.run(self.command(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "WARNING" not in done.stderr
        output: dict[str, list[Any]] = json.loads(done.stdout)
        return output

    def bodies(self) -> Counter[str]:
        """How many times each body ran to completion, across every process so far."""
        return Counter(self.log.read_text().split("\n")[:-1]) if self.log.exists() else Counter()


def cached(results: dict[str, list[Any]]) -> set[str]:
    return {name for name, (_, _, was_cached) in results.items() if was_cached}


@pytest.fixture(params=["asyncio", "trio"])
def pipeline(request: pytest.FixtureRequest, tmp_path: Path) -> Pipeline:
    return Pipeline(tmp_path, request.param)


def test_a_fresh_process_replays_every_task_without_running_a_body(pipeline: Pipeline) -> None:
    first = pipeline.run()
    second = pipeline.run()
    assert cached(first) == set()
    assert cached(second) == set(ALL_TASKS)
    assert {n: r[:2] for n, r in second.items()} == {n: r[:2] for n, r in first.items()}
    assert second["publish"][:2] == ["succeeded", "sent mean 4.0"]
    assert pipeline.bodies() == Counter(ALL_TASKS)


def test_an_edit_reruns_the_task_and_everything_downstream_only(pipeline: Pipeline) -> None:
    pipeline.run()
    pipeline.edit("x * 2", "x * 3")
    results = pipeline.run()
    assert cached(results) == {"load", "count", "slow"}
    assert results["report"][1] == "mean 6.0"
    rerun = ["double", "total", "report", "publish"]
    assert pipeline.bodies() == Counter(ALL_TASKS) + Counter(rerun)


def test_cosmetic_knobs_and_a_renamed_task_keep_the_cache(pipeline: Pipeline) -> None:
    pipeline.run()
    pipeline.edit(
        "@task(depends_on=[load])\ndef double",
        "@task(depends_on=[load], retry=3, timeout_s=60)\ndef double",
    )
    pipeline.edit("def slow():", "def sleepy():")
    pipeline.edit("Flow(report, slow,", "Flow(report, sleepy,")
    results = pipeline.run()
    assert cached(results) == set(ALL_TASKS) - {"slow"} | {"sleepy"}
    assert pipeline.bodies() == Counter(ALL_TASKS)


def test_a_run_killed_mid_way_is_finished_by_the_next_process_running_each_body_once(
    pipeline: Pipeline,
) -> None:
    child = subprocess.Popen(
        pipeline.command(),
        env={**os.environ, "HOLD": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: {"total held", "slow started"} <= set(pipeline.bodies()))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert pipeline.bodies() == Counter(["load", "double", "count", "total held", "slow started"])

    results = pipeline.run()
    assert all(state == "succeeded" for state, _, _ in results.values())
    assert cached(results) == {"load", "double", "count"}
    assert pipeline.bodies() - Counter(["total held", "slow started"]) == Counter(ALL_TASKS)

    assert cached(pipeline.run()) == set(ALL_TASKS)
    assert pipeline.bodies()["publish"] == 1  # the side effect is not fired again


def _wait_for(condition: Any, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "the child process never got there"
        time.sleep(0.02)


APPENDER = textwrap.dedent(
    """
    import logging, os, sys, time
    from flowing import Flow, task

    logging.basicConfig(level=logging.WARNING)
    journal, go, tag = sys.argv[1:4]

    def make(i, tag):
        def body():
            return tag * 100_000 + str(i)
        return task(body, name=f"t{i}")

    flow = Flow(*[make(i, tag) for i in range(30)], journal_path=journal, max_workers=4)
    while not os.path.exists(go):
        time.sleep(0.005)
    results = flow.run()
    assert all(r.succeeded and not r.cached for r in results.values())
    """
)


def test_two_processes_appending_at_once_never_interleave_lines(tmp_path: Path) -> None:
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    journal, go = tmp_path / "shared.jsonl", tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(journal), str(go), tag],
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    go.touch()
    for child in children:
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
        assert "WARNING" not in stderr
    lines = journal.read_bytes().split(b"\n")
    assert lines.pop() == b""
    records = [json.loads(line) for line in lines]
    assert len(records) == len({r["key"] for r in records}) == 60
    assert len(read_records(str(journal))) == 60  # every checksum matches


# In-process behaviour, on both backends.

CALLS: Counter[str] = Counter()


def counted(name: str, value: Any) -> TaskDef[..., Any]:
    def body() -> Any:
        CALLS[name] += 1
        return value

    return task(body, name=name)


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def chain(first_value: Any) -> tuple[TaskDef[..., Any], TaskDef[..., Any]]:
    first = counted("first", first_value)

    @task(depends_on=[first])
    def second(first: Any) -> str:
        CALLS["second"] += 1
        return "second"

    return first, second


async def journaled_chain(tmp_path: Path) -> tuple[TaskDef[..., Any], Path]:
    """``chain(1)``'s ``second``, run once with a journal in ``tmp_path``, and that journal."""
    _, second = chain(1)
    journal = tmp_path / "run.jsonl"
    await Flow(second, journal_path=journal).arun()
    return second, journal


@pytest.mark.anyio
async def test_a_replayed_task_is_reported_as_a_cached_task_finished_event(tmp_path: Path) -> None:
    second, journal = await journaled_chain(tmp_path)
    events: list[Event] = []
    await Flow(second, journal_path=journal, on_event=events.append).arun()
    started = [e for e in events if isinstance(e, FlowStarted)]
    finished = [e for e in events if isinstance(e, TaskFinished)]
    assert started[0].pending == 0 and events.index(started[0]) == 0
    assert [(e.task, e.result.cached, e.result.value) for e in finished] == [
        ("first", True, 1),
        ("second", True, "second"),
    ]
    assert CALLS == {"first": 1, "second": 1}


@pytest.mark.anyio
async def test_a_mapped_step_is_journaled_and_replayed_as_its_list_of_values(
    tmp_path: Path,
) -> None:
    src = counted("src", [1, 2, 3])

    @task(depends_on=[src], map_over="src")
    def each(src: int) -> int:
        CALLS["each"] += 1
        return src * 10

    journal = tmp_path / "run.jsonl"
    await Flow(each, journal_path=journal).arun()
    results = await Flow(each, journal_path=journal).arun()
    assert results["each"].cached and results["each"].value == [10, 20, 30]
    assert CALLS == {"src": 1, "each": 3}


class HalfTextSerializer:
    """A serializer that breaks the protocol for ints: its dumps returns bytes, not str."""

    name = "half-text"

    def dumps(self, value: Any) -> Any:
        return str(value).encode() if isinstance(value, int) else json.dumps(value)

    def loads(self, data: str) -> Any:
        return json.loads(data)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "serializer, value, warning",
    [
        ("pickle", lambda: "not picklable", "the pickle serializer refused it (PicklingError"),
        (
            HalfTextSerializer(),
            1,
            "the half-text serializer refused it (TypeError: its dumps returned bytes, not str)",
        ),
    ],
    ids=["unpicklable-value", "dumps-returns-bytes"],
)
async def test_a_value_the_serializer_refuses_is_not_journaled_and_runs_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, serializer: Any, value: Any, warning: str
) -> None:
    first, second = chain(value)
    journal = tmp_path / "run.jsonl"
    results = await Flow(second, journal_path=journal, serializer=serializer).arun()
    assert all(r.succeeded for r in results.values())
    assert f"'first': its value was not journaled, {warning}" in caplog.text
    results = await Flow(second, journal_path=journal, serializer=serializer).arun()
    assert not results["first"].cached and results["second"].cached
    assert CALLS == {"first": 2, "second": 1}


def _damage(journal: Path, line: int, how: str) -> None:
    lines = journal.read_bytes().split(b"\n")
    if how == "garbage":
        lines[line] = b"{not json"
    elif how == "changed-data":
        record = json.loads(lines[line])
        record["data"] = record["data"][:-4] + "AAA="
        lines[line] = json.dumps(record).encode()
    elif how == "deeply-nested":
        lines[line] = b"[" * 100_000
    elif how == "json-list":
        lines[line] = b"[1]"
    elif how == "version-not-int":
        lines[line] = lines[line].replace(b'"v":1,', b'"v":"1",')
    journal.write_bytes(b"\n".join(lines))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "how", ["garbage", "changed-data", "deeply-nested", "json-list", "version-not-int"]
)
async def test_a_damaged_line_is_skipped_with_a_warning_and_its_task_runs_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    second, journal = await journaled_chain(tmp_path)
    _damage(journal, 0, how)
    results = await Flow(second, journal_path=journal).arun()
    assert "skipped 1 damaged line(s) (line 1)" in caplog.text
    assert not results["first"].cached and results["second"].cached
    assert CALLS == {"first": 2, "second": 1}


@pytest.mark.anyio
async def test_a_truncated_last_line_is_ignored_and_sealed_before_the_next_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second, journal = await journaled_chain(tmp_path)
    content = journal.read_bytes()
    journal.write_bytes(content[: len(content) - 20])  # the crash hit while writing 'second'
    results = await Flow(second, journal_path=journal).arun()
    assert "ends in an unfinished line" in caplog.text
    assert results["first"].cached and not results["second"].cached
    caplog.clear()
    results = await Flow(second, journal_path=journal).arun()
    assert results["first"].cached and results["second"].cached
    assert "damaged" in caplog.text  # the sealed stub, once, and nothing else is lost
    assert CALLS == {"first": 1, "second": 2}


@pytest.mark.anyio
async def test_records_of_another_key_version_are_ignored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second, journal = await journaled_chain(tmp_path)
    journal.write_text(journal.read_text().replace('"v":1,', '"v":0,'))
    with caplog.at_level(logging.WARNING, "flowing"):
        results = await Flow(second, journal_path=journal).arun()
    assert not any(r.cached for r in results.values())
    assert caplog.messages == [
        f"journal {str(journal)!r}: ignored 2 record(s) written by another flowing release "
        f"(a step-key version other than 1)"
    ]


def _mapped_doubles() -> TaskDef[..., Any]:
    @task
    def items() -> list[int]:
        return [1, 2, 3]

    @task(depends_on=[items], map_over=items)
    def double(items: int) -> int:
        return items * 2

    return double


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("build", "records"),
    [(lambda: chain([1, 2])[1], 2), (_mapped_doubles, 5)],
    ids=["chain", "mapped-instances"],
)
async def test_records_of_another_serializer_run_again_with_one_warning_counting_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, build: Any, records: int
) -> None:
    terminal = build()
    journal = tmp_path / "run.jsonl"
    await Flow(terminal, journal_path=journal, serializer="pickle").arun()
    with caplog.at_level(logging.WARNING, logger="flowing"):
        results = await Flow(terminal, journal_path=journal, serializer="json").arun()
    assert not any(r.cached for r in results.values())
    assert caplog.messages == [
        f"journal {str(journal)!r}: ignored {records} record(s) written by the 'pickle' "
        f"serializer; this flow uses 'json', so their tasks run again"
    ]


@pytest.mark.anyio
async def test_the_json_serializer_round_trips_plain_data_and_refuses_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    value = {"rows": [1, 2.5, "x", None, True], "nested": {"k": []}}
    first, second = chain(value)
    journal = tmp_path / "run.jsonl"
    await Flow(second, journal_path=journal, serializer="json").arun()
    assert json.loads(json.loads(journal.read_text().split("\n")[0])["data"]) == value
    results = await Flow(second, journal_path=journal, serializer="json").arun()
    assert results["first"].cached and results["first"].value == value
    tupled = counted("tupled", (1, 2))
    await Flow(tupled, journal_path=tmp_path / "t.jsonl", serializer="json").arun()
    assert "json serializer refused it (ValueError: tuple value would not survive" in caplog.text


@pytest.mark.anyio
async def test_records_written_by_another_serializer_are_not_read(tmp_path: Path) -> None:
    first, second = chain([1])
    journal = tmp_path / "run.jsonl"
    await Flow(second, journal_path=journal, serializer="pickle").arun()
    results = await Flow(second, journal_path=journal, serializer="json").arun()
    assert not any(r.cached for r in results.values())


@pytest.mark.anyio
async def test_resume_replays_what_another_flow_journaled_meanwhile(tmp_path: Path) -> None:
    attempts: list[str] = []

    @task
    def flaky() -> str:
        attempts.append("flaky")
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    journal = tmp_path / "run.jsonl"
    this, other = Flow(flaky, journal_path=journal), Flow(flaky, journal_path=journal)
    assert (await this.arun())["flaky"].state is StepState.FAILED
    assert (await other.arun())["flaky"].value == "ok"
    resumed = await this.aresume()
    assert resumed["flaky"].cached and resumed["flaky"].value == "ok"
    assert attempts == ["flaky", "flaky"]


@pytest.mark.anyio
async def test_fresh_runs_everything_again_and_starts_a_new_journal(tmp_path: Path) -> None:
    first, second = chain(1)
    journal = tmp_path / "run.jsonl"
    flow = Flow(second, journal_path=journal, journal_fsync=True)
    await flow.arun()
    results = await flow.arun(fresh=True)
    assert not any(r.cached for r in results.values())
    assert CALLS == {"first": 2, "second": 2}
    assert len(journal.read_text().splitlines()) == 2


@pytest.mark.anyio
async def test_an_overridden_value_is_used_but_neither_it_nor_its_dependents_are_journaled(
    tmp_path: Path,
) -> None:
    first, second = chain(1)
    journal = tmp_path / "run.jsonl"
    flow = Flow(second, journal_path=journal)
    flow.override(first, 99)
    results = await flow.arun()
    assert results["second"].step_key is None and not journal.exists()


def _special_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "run.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it to read would wait for a writer forever
    else:
        return Path(os.devnull)
    return path


SPECIAL_FILES = ["directory", "fifo", "device"]


@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_a_journal_path_that_is_not_a_regular_file_is_refused_when_the_flow_is_built(
    tmp_path: Path, kind: str
) -> None:
    first, second = chain(1)
    path = _special_file(tmp_path, kind)
    with pytest.raises(InvalidJournalError, match="cannot be used as a journal: it is a"):
        Flow(second, journal_path=path)
    with pytest.raises(InvalidJournalError, match="cannot be used as a journal: it is a"):
        compact_journal(path)


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["~/run.jsonl", "~user/runs/run.jsonl"])
async def test_a_journal_path_starting_with_a_tilde_is_refused_saying_it_is_not_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder named '~' here
    first, second = chain(1)
    with pytest.raises(InvalidJournalError) as refused:
        await Flow(second, journal_path=path).arun()
    folder = os.path.dirname(os.path.abspath(path))
    assert str(refused.value) == (
        f"{path!r} cannot be used as a journal: its folder {folder!r} does not exist; "
        f"'~' is not expanded: pass os.path.expanduser({path!r}) for a home folder"
    )


UNWRITABLE = {
    "missing-folder": "its folder '.*nope' does not exist; create the folder first",
    "file-as-folder": r"opening it to read and append failed \(Not a directory\)",
    "directory": "it is a directory",
    "fifo": "it is a FIFO, not a regular file",
    "proc-file": "none of its lines is a journal record|opening it to read and append",
}


@pytest.mark.anyio
@pytest.mark.parametrize("where, problem", UNWRITABLE.items(), ids=UNWRITABLE.keys())
async def test_a_journal_that_cannot_be_written_is_refused_before_any_task_runs(
    tmp_path: Path, where: str, problem: str
) -> None:
    first, second = chain(1)
    path = {
        "missing-folder": tmp_path / "nope" / "run.jsonl",
        "file-as-folder": tmp_path / "results.csv" / "run.jsonl",
        "proc-file": Path("/proc/version"),
    }.get(where, tmp_path / "run.jsonl")
    if where == "proc-file" and not path.exists():
        pytest.skip("no /proc here")
    if where == "file-as-folder":
        (tmp_path / "results.csv").write_text("id,score\n")
    flow = Flow(second, journal_path=path)
    if where in SPECIAL_FILES:
        _special_file(tmp_path, where)  # it appears after the flow was built
    with pytest.raises(InvalidJournalError, match=problem) as refused:
        await flow.arun()
    assert CALLS == {}
    reasons = {(r.state, r.reason) for r in flow.results.values()}
    assert reasons == {(StepState.CANCELLED, f"not started: {refused.value}")}


@pytest.mark.anyio
async def test_a_journal_that_fails_mid_run_warns_and_the_run_keeps_its_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "run.jsonl"

    @task
    def first() -> int:
        journal.mkdir()  # the journal path can no longer be written
        return 1

    @task(depends_on=[first])
    def second(first: int) -> int:
        return first + 1

    results = await Flow(second, journal_path=journal).arun()
    assert [r.value for r in results.values()] == [1, 2]
    assert "'first': its value was not journaled" in caplog.text


FOREIGN_FILES = {
    "csv": b"id,score\n1,0.93\n2,0.71\n",
    "python": b"import os\n\nprint(os.getcwd())\n",
    "json-document": b'{\n  "v": 1\n}\n',
    "binary": bytes(range(256)),
}


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["run", "fresh-run", "compact"])
@pytest.mark.parametrize("content", FOREIGN_FILES.values(), ids=FOREIGN_FILES.keys())
async def test_another_programs_file_is_refused_as_a_journal_and_left_untouched(
    tmp_path: Path, action: str, content: bytes
) -> None:
    first, second = chain(1)
    path = tmp_path / "results.csv"
    path.write_bytes(content)
    with pytest.raises(InvalidJournalError, match="none of its lines is a journal record"):
        if action == "compact":
            compact_journal(path)
        else:
            await Flow(second, journal_path=path).arun(fresh=action == "fresh-run")
    assert path.read_bytes() == content
    assert CALLS == {}


RECORD = encode_record("a" * 64, "old", "pickle", "gARLAS4=")
CRASH_LEFTOVERS = {
    "empty": b"",
    "unfinished-first-record": RECORD[:40],
    "sealed-stub": RECORD[:40] + b"\n",
    "bad-checksum": RECORD.replace(b'"check":"', b'"check":"0'),
    "zeros": b"\0" * 4096,
    "zeros-then-a-record": b"\0" * 100 + RECORD,
    "garbage-then-a-record": b"{not json\n" + RECORD,
}


@pytest.mark.anyio
@pytest.mark.parametrize("content", CRASH_LEFTOVERS.values(), ids=CRASH_LEFTOVERS.keys())
async def test_a_journal_holding_only_what_a_crash_left_is_still_used_and_compacted(
    tmp_path: Path, content: bytes
) -> None:
    first, second = chain(1)
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(content)
    results = await Flow(second, journal_path=journal).arun()
    assert all(r.succeeded and not r.cached for r in results.values())
    compact_journal(journal)
    assert {"first", "second"} <= {r.task for r in read_records(str(journal)).values()}
    results = await Flow(second, journal_path=journal).arun()
    assert all(r.cached for r in results.values())


@pytest.mark.parametrize(
    "wanted",
    [lambda flow: flow.step_keys().values(), lambda flow: flow.step_keys()],
    ids=["iterable-of-keys", "mapping-by-its-values"],
)
def test_compaction_keeps_the_latest_valid_record_of_each_wanted_key(
    tmp_path: Path, wanted: Any
) -> None:
    first, second = chain(1)
    journal = tmp_path / "run.jsonl"
    flow = Flow(second, journal_path=journal)
    flow.run()
    good = journal.read_bytes()
    old_key = encode_record("0" * 64, "edited-away", "pickle", "gARLAS4=")
    journal.write_bytes(good + good + old_key + b"{damaged\n" + b"[" * 100_000 + b"\n")
    assert compact_journal(journal) == 4
    assert journal.read_bytes().count(b"\n") == 3
    assert compact_journal(journal, keep=wanted(flow)) == 1
    assert journal.read_bytes() == good
    results = flow.run()
    assert all(r.cached for r in results.values())


def test_an_append_that_raced_a_compaction_lands_in_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(encode_record("a" * 64, "old", "pickle", "gARLAS4="))
    real_lock = flowing._journal._lock
    raced = []

    def compaction_wins_the_race(fd: int, *, exclusive: bool) -> None:
        if not raced:  # the appender has opened the old file; compaction replaces it now
            raced.append(True)
            compact_journal(journal)
        real_lock(fd, exclusive=exclusive)

    monkeypatch.setattr(flowing._journal, "_lock", compaction_wins_the_race)
    line = encode_record("b" * 64, "late", "pickle", "gARLAi4=")
    Journal(journal, PickleSerializer(), fsync=False).append(line)
    assert raced and journal.read_bytes().endswith(line)


@pytest.mark.parametrize(
    "keep, problem",
    [
        ("f6f181d6d4bb", "one key would be read as its characters; pass keep=\\[key\\]"),
        (b"f6f181d6d4bb", "one key would be read as its characters"),
        ([1], "1 is not a step key"),
        (5, "it is not iterable"),
    ],
    ids=["str", "bytes", "not-keys", "not-iterable"],
)
def test_a_keep_that_is_not_step_keys_is_refused_and_the_journal_left_as_it_was(
    tmp_path: Path, keep: Any, problem: str
) -> None:
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(RECORD)
    with pytest.raises(InvalidKeepError, match=f"takes the step keys to keep.*: {problem}"):
        compact_journal(journal, keep=keep)
    assert journal.read_bytes() == RECORD


def test_compacting_a_missing_journal_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no journal at"):
        compact_journal(tmp_path / "nothing.jsonl")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"journal_path": 3}, "3 cannot be used as a journal: the path must be a non-empty str"),
        ({"journal_path": ""}, "'' cannot be used as a journal: the path must be a non-empty str"),
        ({"journal_path": b"j.jsonl"}, "the path is bytes; decode it with os.fsdecode"),
        (
            {"journal_path": "j.jsonl", "journal_fsync": "false"},
            "journal_fsync must be True or False, got 'false'",
        ),
        ({"journal_fsync": 1}, "journal_fsync must be True or False, got 1"),
        ({"journal_path": "j.jsonl", "serializer": "yaml"}, "serializer must be 'pickle', 'json'"),
        ({"serializer": "yaml"}, "serializer must be 'pickle', 'json'"),
    ],
    ids=[
        "int-path", "empty-path", "bytes-path", "fsync-str", "fsync-without-journal",
        "serializer", "serializer-without-journal",
    ],
)
def test_bad_journal_options_are_refused_before_anything_runs(
    options: dict[str, Any], message: str
) -> None:
    first, second = chain(1)
    with pytest.raises(FlowDefinitionError, match=message):
        Flow(second, **options)


MAPPED_OVER_A_SET = textwrap.dedent(
    """
    import json, os, sys
    from flowing import Flow, task

    journal = sys.argv[1]

    WORDS = {"alpha", "bravo", "charlie", "delta", "echo", "foxtrot"}

    @task
    def names():  # a generator is not journaled: it runs again in each process
        return WORDS if os.environ["SOURCE"] == "set" else (w for w in WORDS)

    @task(depends_on=[names], map_over="names")
    def shout(names):  # the same code in both processes: its journaled results count
        if names == os.environ["BROKEN"]:
            raise RuntimeError(names + " is broken")
        return names.upper()

    result = Flow(shout, journal_path=journal, fail_fast=False).run()["shout"]
    print(json.dumps([result.state.value, result.value]))
    """
)


@pytest.mark.parametrize("source", ["set", "generator"])
def test_instances_of_a_step_mapped_over_a_set_replay_their_own_elements_in_another_process(
    tmp_path: Path, source: str
) -> None:
    """A set of strings iterates in another order under another hash seed (replayed,
    or made again by its task): each replayed instance must be its own element's result."""
    script = tmp_path / "child.py"
    script.write_text(MAPPED_OVER_A_SET)
    journal = tmp_path / "run.jsonl"

    def run(seed: str, broken: str) -> Any:
        env = {**os.environ, "PYTHONHASHSEED": seed, "BROKEN": broken, "SOURCE": source}
        done = subprocess.run(
            [sys.executable, str(script), str(journal)],
            capture_output=True, text=True, timeout=60, env=env, check=True,
        )
        return json.loads(done.stdout)

    assert run("1", "echo")[0] == "failed"
    state, value = run("2", "none")
    assert state == "succeeded"
    assert sorted(value) == ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT"]


def _refusal(tmp_path: Path, kind: str) -> tuple[Any, str]:
    """A journal path that is refused for ``kind``, and the problem and fix it is told."""
    path = tmp_path / "run.jsonl"
    if kind == "bytes":
        return b"run.jsonl", "the path is bytes; decode it with os.fsdecode(path)"
    if kind == "nul":
        return "run\0.jsonl", "the path must be a non-empty str or os.PathLike; give e.g. 'run.jsonl'"
    if kind == "directory":
        path.mkdir()
        return path, f"it is a directory; give a file path, such as {str(path / 'run.jsonl')!r}"
    if kind == "fifo":
        os.mkfifo(path)
        return path, "it is a FIFO, not a regular file; give the path of a regular file"
    if kind == "missing-folder":
        path = tmp_path / "nope" / "run.jsonl"
        return path, f"its folder {str(path.parent)!r} does not exist; create the folder first"
    if kind == "file-as-folder":
        (tmp_path / "results.csv").write_text("id\n")
        return tmp_path / "results.csv" / "run.jsonl", (
            "opening it to read and append failed (Not a directory); "
            "check its permissions, or give another path"
        )
    path.write_text("id,score\n")
    return path, (
        "it is not empty and none of its lines is a journal record (another program's file?); "
        "give the path of a new or empty file (this one is left as it was)"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    "kind",
    ["bytes", "nul", "directory", "fifo", "missing-folder", "file-as-folder", "foreign-file"],
)
async def test_a_refused_journal_is_named_with_its_problem_and_the_fix(
    tmp_path: Path, kind: str
) -> None:
    first, second = chain(1)
    path, told = _refusal(tmp_path, kind)
    with pytest.raises(FlowDefinitionError) as refused:
        await Flow(second, journal_path=path).arun()
    shown = os.fspath(path) if isinstance(path, Path) else path
    assert str(refused.value) == f"{shown!r} cannot be used as a journal: {told}"


@pytest.mark.parametrize("kind", ["directory", "foreign-file"])
def test_compaction_refuses_a_path_naming_it(tmp_path: Path, kind: str) -> None:
    path, told = _refusal(tmp_path, kind)
    with pytest.raises(InvalidJournalError) as refused:
        compact_journal(path)
    assert str(refused.value) == f"{str(path)!r} cannot be used as a journal: {told}"


@pytest.mark.anyio
async def test_a_journal_in_a_folder_that_cannot_be_written_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = chain(1)
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)
    path = tmp_path / "run.jsonl"
    with pytest.raises(InvalidJournalError) as refused:
        await Flow(second, journal_path=path).arun()
    assert str(refused.value) == (
        f"{str(path)!r} cannot be used as a journal: it does not exist and its folder "
        f"{str(tmp_path)!r} is not writable; give a path in a folder you can write to"
    )


@pytest.mark.parametrize(
    "keep", ["f6f181d6d4bb", [1], 5], ids=["str", "not-keys", "not-iterable"]
)
def test_a_refused_keep_is_shown_in_the_error(tmp_path: Path, keep: Any) -> None:
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(RECORD)
    with pytest.raises(InvalidKeepError, match=re.escape(f"but got {keep!r}: ")):
        compact_journal(journal, keep=keep)


@pytest.mark.anyio
async def test_a_replayed_result_says_so_and_carries_its_key_and_detached_flag(
    tmp_path: Path,
) -> None:
    first, second = chain(1)

    @task(depends_on=[first], detached=True)
    def side(first: int) -> int:
        return first

    journal = tmp_path / "run.jsonl"
    flow = Flow(second, journal_path=journal)
    await flow.arun()
    results = await flow.arun()
    keys = flow.step_keys()
    assert {(r.cached, r.reason, r.step_key) for r in results.values()} == {
        (True, "replayed from the journal", keys[name]) for name in results
    }
    assert [r.name for r in results.values() if r.detached] == ["side"]


class Refusing:
    """A serializer that writes every value and can read none back."""

    name = "refusing"

    def dumps(self, value: Any) -> str:
        return "x"

    def loads(self, data: str) -> Any:
        raise ValueError(f"cannot read {data!r}")


@pytest.mark.anyio
async def test_a_value_that_cannot_be_loaded_is_run_again_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = chain(1)
    flow = Flow(second, journal_path=tmp_path / "run.jsonl", serializer=Refusing())
    await flow.arun()
    with caplog.at_level(logging.WARNING, "flowing"):
        results = await flow.arun()
    assert not any(r.cached for r in results.values())
    assert caplog.messages == [
        f"task {name!r}: its journaled value could not be loaded "
        f"(ValueError: cannot read 'x'); running it again"
        for name in ("first", "second")
    ]


class Surrogates:
    """A serializer whose text holds a lone surrogate, as str allows."""

    name = "surrogates"

    def dumps(self, value: Any) -> str:
        return "\ud800" + str(value)

    def loads(self, data: str) -> Any:
        return int(data[1:])


@pytest.mark.anyio
async def test_any_str_a_serializer_returns_is_journaled_and_replayed(tmp_path: Path) -> None:
    first, second = chain(1)
    flow = Flow(first, journal_path=tmp_path / "run.jsonl", serializer=Surrogates())
    await flow.arun()
    assert (await flow.arun())["first"].cached


@pytest.mark.anyio
@pytest.mark.parametrize("damaged", [10, 11])
async def test_the_damaged_and_unfinished_line_warnings_name_the_journal_and_the_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damaged: int
) -> None:
    first, second = chain(1)
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(RECORD + b"{damaged\n" * damaged + b"{unfinished")
    with caplog.at_level(logging.WARNING, "flowing"):
        read_records(str(journal))
        await Flow(second, journal_path=journal).arun()
    lines = ", ".join(str(n) for n in range(2, 12)) + (" ..." if damaged > 10 else "")
    assert caplog.messages == 2 * [
        f"journal {str(journal)!r} ends in an unfinished line (a crash mid-write?); it is ignored",
        f"journal {str(journal)!r}: skipped {damaged} damaged line(s) (line {lines})",
    ]


@pytest.mark.anyio
async def test_blank_lines_between_records_are_skipped(tmp_path: Path) -> None:
    second, journal = await journaled_chain(tmp_path)
    journal.write_bytes(b"\n" + journal.read_bytes().replace(b"\n", b"\n\n"))
    results = await Flow(second, journal_path=journal).arun()
    assert all(r.cached for r in results.values())


@pytest.mark.anyio
async def test_a_fresh_run_empties_the_journal_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second, journal = await journaled_chain(tmp_path)
    with caplog.at_level(logging.WARNING, "flowing"):
        await Flow(second, journal_path=journal).arun(fresh=True)
    assert caplog.messages == []


@pytest.mark.anyio
@pytest.mark.parametrize("fsync", [True, False])
async def test_journal_fsync_syncs_each_record_and_a_new_journals_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    first, second = chain(1)
    await Flow(second, journal_path=tmp_path / "run.jsonl", journal_fsync=fsync).arun()
    assert synced == (["file", "folder", "file"] if fsync else [])


def test_a_new_journal_is_created_without_execute_permission(tmp_path: Path) -> None:
    first, second = chain(1)
    journal = tmp_path / "run.jsonl"
    Flow(second, journal_path=journal).run()
    assert journal.stat().st_mode & 0o111 == 0


def test_compaction_keeps_the_journals_permissions(tmp_path: Path) -> None:
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(RECORD + RECORD)
    journal.chmod(0o640)
    compact_journal(journal)
    assert stat.S_IMODE(journal.stat().st_mode) == 0o640


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_compaction_that_fails_leaves_the_journal_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(RECORD + RECORD)

    calls: list[tuple[Any, ...]] = []

    def fail(*args: Any) -> None:
        calls.append(args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space left on device"):
        compact_journal(journal)
    assert journal.read_bytes() == RECORD + RECORD
    assert os.listdir(tmp_path) == ["run.jsonl"]
    if failing == "replace":  # the new file was written beside the journal, hidden
        temporary = Path(calls[0][0])
        assert temporary.parent == tmp_path and temporary.name.startswith(".journal-")


def test_an_append_whose_file_was_deleted_meanwhile_lands_in_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(RECORD)
    real_lock = flowing._journal._lock

    def deleted_before_the_lock(fd: int, *, exclusive: bool) -> None:
        if journal.exists() and journal.read_bytes() == RECORD:
            journal.unlink()
        real_lock(fd, exclusive=exclusive)

    monkeypatch.setattr(flowing._journal, "_lock", deleted_before_the_lock)
    line = encode_record("b" * 64, "late", "pickle", "gARLAi4=")
    Journal(journal, PickleSerializer(), fsync=False).append(line)
    assert journal.read_bytes() == line


def test_reading_a_missing_journal_finds_no_records_and_warns_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "flowing"):
        assert read_records(str(tmp_path / "nothing.jsonl")) == {}
    assert caplog.messages == []


def test_reading_a_directory_as_a_journal_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidJournalError, match=f"^{re.escape(repr(str(tmp_path)))} .*directory"):
        read_records(str(tmp_path))


@pytest.mark.anyio
async def test_reads_share_the_lock_and_writes_take_it_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bool] = []
    real_lock = flowing._journal._lock

    def recording_lock(fd: int, *, exclusive: bool) -> None:
        taken.append(exclusive)
        real_lock(fd, exclusive=exclusive)

    monkeypatch.setattr(flowing._journal, "_lock", recording_lock)
    first, second = chain(1)
    journal = tmp_path / "run.jsonl"
    flow = Flow(second, journal_path=journal)
    await flow.arun()  # no file to open yet; two appends
    await flow.arun()  # opened to replay
    await flow.arun(fresh=True)  # emptied, then two appends
    read_records(str(journal))
    compact_journal(journal)
    assert taken == [True, True, False, True, True, True, False, True]


@pytest.mark.anyio
async def test_a_journaled_result_carries_its_step_key(tmp_path: Path) -> None:
    first, second = chain(1)
    flow = Flow(second, journal_path=tmp_path / "run.jsonl")
    results = await flow.arun()
    assert {name: r.step_key for name, r in results.items()} == flow.step_keys()


@pytest.mark.anyio
async def test_a_record_that_cannot_be_written_is_warned_about_naming_the_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "run.jsonl"

    @task
    def first() -> int:
        journal.mkdir()
        return 1

    with caplog.at_level(logging.WARNING, "flowing"):
        await Flow(first, journal_path=journal).arun()
    assert caplog.messages == [
        f"task 'first': its value was not journaled, writing {str(journal)!r} failed: "
        f"[Errno {errno.EISDIR}] Is a directory: {str(journal)!r}"
    ]


def test_a_task_without_a_step_key_is_run_uncached_with_a_warning_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    odd = task(lambda x=object(): x, name="odd")
    with caplog.at_level(logging.WARNING, "flowing"):
        Flow(odd, journal_path=tmp_path / "run.jsonl").run()
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith(
        "task 'odd' is not cached: task 'odd' has no step key: a default of the body is object"
    )


def test_compaction_counts_removed_lines_and_names_the_journal_in_its_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "run.jsonl"
    spaced = encode_record("a" * 64, "t", "json", "[1, 2, 3]")
    journal.write_bytes(spaced + spaced + b"{damaged\n")
    with caplog.at_level(logging.WARNING, "flowing"):
        assert compact_journal(journal) == 2
    assert caplog.messages == [f"journal {str(journal)!r}: skipped 1 damaged line(s) (line 3)"]
