"""The ``flowing`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from flowing import __version__
from test_render import Parsed, by_name, parse_dot, parse_mermaid

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "etl.py"

PIPELINE = """
    from flowing import task

    @task
    def extract():
        return [1, 2, 3]

    @task(depends_on=[extract])
    def total(extract):
        return sum(extract)

    @task(depends_on=[extract])
    def as_set(extract):
        return set(extract)

    @task(depends_on=[total], when=lambda total: total > 100)
    def alert(total):
        return "big"
"""


def flowing(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m flowing ARGS`` with stderr a pipe, as a script or CI would."""
    env = {**os.environ, "PYTHONWARNINGS": "", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "flowing", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def write(tmp_path: Path, source: str, name: str = "pipeline.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "flowing"
    if not script.exists():
        pytest.skip("no console script beside this interpreter (not a pip-installed venv)")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"flowing {__version__}\n")


def test_the_example_pipeline_runs_with_a_retry_a_skip_and_a_detached_task() -> None:
    done = flowing("run", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("ok: 10 succeeded, 1 skipped in ")
    progress = done.stderr.splitlines()
    assert progress[0].endswith("flow       started: 11 of 11 tasks to run")
    assert any("retry      fetch_exchange_rates  attempt 1/3 failed" in line for line in progress)
    assert any("ok         fetch_exchange_rates" in line and "after 2 attempts" in line for line in progress)
    assert any("skipped    page_on_call  (when= returned a falsy value)" in line for line in progress)
    assert "ok         notify_team" in progress[-2]
    assert "flow       finished in" in progress[-1]


def test_json_prints_every_result_and_reprs_what_json_cannot_hold(tmp_path: Path) -> None:
    done = flowing("run", str(write(tmp_path, PIPELINE)), "--json", "--quiet")
    assert (done.returncode, done.stderr) == (0, "")
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert {name: (t["state"], t["value"]) for name, t in report["tasks"].items()} == {
        "extract": ("succeeded", [1, 2, 3]),
        "total": ("succeeded", 6),
        "as_set": ("succeeded", "{1, 2, 3}"),
        "alert": ("skipped", None),
    }


ODD_VALUE = """
    from flowing import task

    class Bad:
        def __repr__(self):
            raise RuntimeError("no repr")

    @task
    def odd():
        return {value}

    @task
    def fine():
        return 6
"""


@pytest.mark.parametrize(
    "value,shown",
    [
        ("Bad()", "<unrepresentable Bad>"),
        ("10 ** 5000", "<unrepresentable int>"),
        ("[1, 10 ** 5000]", "<unrepresentable list>"),
    ],
    ids=["repr-raises", "int-too-long-for-str", "inside-a-list"],
)
def test_json_shows_a_value_without_a_repr_as_a_placeholder_naming_its_type(
    tmp_path: Path, value: str, shown: str
) -> None:
    done = flowing("run", str(write(tmp_path, ODD_VALUE.format(value=value))), "--json", "--quiet")
    assert (done.returncode, done.stderr) == (0, "")
    tasks = json.loads(done.stdout)["tasks"]
    assert (tasks["odd"]["value"], tasks["fine"]["value"]) == (shown, 6)


def test_named_tasks_run_only_what_they_need(tmp_path: Path) -> None:
    done = flowing("run", f"{write(tmp_path, PIPELINE)}:total", "--json", "--quiet")
    assert list(json.loads(done.stdout)["tasks"]) == ["extract", "total"]


def test_a_failed_task_exits_1_and_shows_in_the_summary(tmp_path: Path) -> None:
    source = """
        from flowing import task

        @task
        def load():
            raise ValueError("bad row 7")
    """
    done = flowing("run", str(write(tmp_path, source)))
    assert done.returncode == 1
    assert "FAILED     load" in done.stderr
    assert "ValueError: bad row 7" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("FAILED: 1 failed in ")


EXIT_STATUSES = {
    "all-succeeded": ("@task\ndef a(): return 1\n", 0),
    "skipped-by-its-own-when": ("@task(when=lambda: False)\ndef a(): return 1\n", 0),
    "skipped-below-a-when": (
        "@task(when=lambda: False)\ndef a(): return 1\n@task(depends_on=[a])\ndef b(a): return a\n",
        0,
    ),
    "skipped-below-a-failure": (
        "@task\ndef a(): raise ValueError('no')\n@task(depends_on=[a])\ndef b(a): return a\n",
        1,
    ),
    "detached-failed": (
        "@task\ndef a(): return 1\n@task(depends_on=[a], detached=True)\ndef b(a): raise ValueError('no')\n",
        1,
    ),
}


@pytest.mark.parametrize("source,status", EXIT_STATUSES.values(), ids=EXIT_STATUSES.keys())
def test_the_exit_status_is_0_unless_a_task_failed_or_was_cancelled(
    tmp_path: Path, source: str, status: int
) -> None:
    done = flowing("run", str(write(tmp_path, "from flowing import task\n" + source)), "--quiet")
    assert (done.returncode, done.stderr) == (status, "")


def test_run_help_gives_the_exit_statuses_as_the_readme_does() -> None:
    done = flowing("run", "--help")
    shown = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert (
        "exit status: 0 every task succeeded or was skipped by a when= gate (its own or an "
        "upstream task's), 1 a task failed (or was skipped because of a failure, or cancelled), "
        "2 bad input (or an unwritable --timeline after a run that succeeded), 130 interrupted"
    ) in shown
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (
        "| 0 | every task succeeded or was skipped by a `when=` gate (its own or an upstream task's) |"
    ) in readme


def test_quiet_prints_nothing_and_still_sets_the_status(tmp_path: Path) -> None:
    done = flowing("run", str(write(tmp_path, PIPELINE)), "--quiet", "--no-fail-fast", "--max-workers", "2")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_either_backend_runs_the_flow(tmp_path: Path, backend: str) -> None:
    done = flowing("run", str(write(tmp_path, PIPELINE)), "--quiet", "--json", "--backend", backend)
    assert json.loads(done.stdout)["tasks"]["total"]["value"] == 6


def test_a_journal_replays_successes_in_the_next_process(tmp_path: Path) -> None:
    pipeline, journal = write(tmp_path, PIPELINE), tmp_path / "run.journal"
    first = flowing("run", str(pipeline), "--journal", str(journal), "--json", "--quiet")
    second = flowing("run", str(pipeline), "--journal", str(journal), "--json", "--quiet")
    cached = {name: t["cached"] for name, t in json.loads(second.stdout)["tasks"].items()}
    assert first.returncode == second.returncode == 0
    assert cached["extract"] is True and cached["total"] is True


def test_fresh_empties_the_journal_so_every_task_runs_again(tmp_path: Path) -> None:
    pipeline, journal = write(tmp_path, PIPELINE), tmp_path / "run.journal"
    flowing("run", str(pipeline), "--journal", str(journal), "--quiet")
    again = flowing("run", str(pipeline), "--journal", str(journal), "--fresh", "--json", "--quiet")
    assert again.returncode == 0, again.stderr
    assert not any(t["cached"] for t in json.loads(again.stdout)["tasks"].values())


STUCK = """
    import threading
    from flowing import task

    @task
    def quick():
        return 1

    @task(depends_on=[quick])
    def stuck(quick):
        threading.Event().wait()  # never set: only the timeout ends the run
"""


def test_timeout_cancels_what_is_unfinished_and_exits_1(tmp_path: Path) -> None:
    done = flowing("run", str(write(tmp_path, STUCK)), "--timeout", "0.2", "--json")
    states = {name: t["state"] for name, t in json.loads(done.stdout)["tasks"].items()}
    assert done.returncode == 1
    assert states == {"quick": "succeeded", "stuck": "cancelled"}
    assert done.stderr.splitlines()[-1] == "flowing: --timeout 0.2: cancelled 1 unfinished task(s)"


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".mmd", b"gantt")])
def test_timeline_writes_the_chart(tmp_path: Path, suffix: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / f"run{suffix}"
    done = flowing("run", str(write(tmp_path, PIPELINE)), "--timeline", str(chart))
    assert done.returncode == 0, done.stderr
    assert chart.read_bytes().startswith(magic)
    assert f"timeline written to {chart}" in done.stderr


DIRECTORY_REFUSED = {
    "--timeline": "--timeline 'chart.mmd' is a directory; give a file path",
    "--journal": "--journal 'chart.mmd' cannot be used as a journal: it is a directory; "
    "give a file path, such as 'chart.mmd/run.jsonl'",
}


@pytest.mark.parametrize("option,message", DIRECTORY_REFUSED.items(), ids=DIRECTORY_REFUSED.keys())
def test_a_directory_given_as_an_output_file_is_refused_before_anything_runs(
    tmp_path: Path, option: str, message: str
) -> None:
    (tmp_path / "chart.mmd").mkdir()
    source = PIPELINE.replace("return [1, 2, 3]", "raise SystemExit('must not run')")
    done = flowing("run", str(write(tmp_path, source)), option, "chart.mmd", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"flowing: error: {message}\n"


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _csv(path: Path) -> None:
    path.write_text("name,score\nada,3\n")


def _read_only(path: Path) -> None:
    path.write_bytes(b"")
    path.chmod(0o444)


UNUSABLE_JOURNALS = {
    "fifo": (_fifo, "it is a FIFO, not a regular file; give the path of a regular file"),
    "another-program's-file": (_csv, "it is not empty and none of its lines is a journal record"),
    "read-only": (_read_only, "opening it to read and append failed (Permission denied)"),
}


@pytest.mark.parametrize("make,problem", UNUSABLE_JOURNALS.values(), ids=UNUSABLE_JOURNALS.keys())
def test_a_journal_path_the_journal_refuses_is_one_line_before_anything_runs(
    tmp_path: Path, make: Callable[[Path], None], problem: str
) -> None:
    if make is _fifo and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    if make is _read_only and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root may write a read-only file")
    make(tmp_path / "run.journal")
    source = PIPELINE.replace("return [1, 2, 3]", "raise SystemExit('must not run')")
    done = flowing("run", str(write(tmp_path, source)), "--journal", "run.journal", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(
        f"flowing: error: --journal 'run.journal' cannot be used as a journal: {problem}"
    )
    assert len(done.stderr.splitlines()) == 1


SQUATTER = """
    import os
    from flowing import task

    @task
    def squat():
        os.mkdir("chart.mmd")  # the timeline's path is a directory by the time the run ends
        return 1
"""


@pytest.mark.parametrize(
    "extra,status",
    [("", 2), ("@task(depends_on=[squat])\ndef broken(squat):\n    raise ValueError('no')\n", 1)],
    ids=["run-succeeded-exits-2", "run-failed-exits-1"],
)
def test_a_timeline_that_cannot_be_written_is_one_line_after_the_results(
    tmp_path: Path, extra: str, status: int
) -> None:
    write(tmp_path, textwrap.dedent(SQUATTER) + extra)
    done = flowing("run", "pipeline.py", "--timeline", "chart.mmd", "--json", cwd=tmp_path)
    assert done.returncode == status
    assert json.loads(done.stdout)["tasks"]["squat"]["value"] == 1
    assert done.stderr.splitlines()[-1].startswith(
        "flowing: error: cannot write the timeline to 'chart.mmd': "
    )


POOLED = """
    import threading
    from flowing import Pool, task

    both_in = threading.Barrier(2, timeout={timeout})
    {pools}

    @task(pool="api")
    def first():
        both_in.wait()

    @task(pool="api")
    def second():
        both_in.wait()
"""


@pytest.mark.parametrize(
    "pools,options,timeout,status",
    [
        ("POOLS = {'api': 2}", [], 60, 0),
        ("POOLS = {'api': Pool(2, rate=1000)}", [], 60, 0),
        ("", ["--pool", "api=2"], 60, 0),
        ("POOLS = {'api': Pool(1, rate=1000)}", ["--pool", "api=2"], 60, 0),
        ("POOLS = {'api': 1}", [], 1, 1),
    ],
    ids=["file-size", "file-pool", "option", "option-over-file", "size-1-never-overlaps"],
)
def test_pools_come_from_the_files_POOLS_dict_and_the_pool_option(
    tmp_path: Path, pools: str, options: list[str], timeout: int, status: int
) -> None:
    source = POOLED.format(timeout=timeout, pools=pools)
    done = flowing("run", str(write(tmp_path, source)), "--quiet", "--no-fail-fast", *options)
    assert (done.returncode, done.stderr) == (status, "")


@pytest.mark.parametrize(
    "fmt,parse", [("mermaid", parse_mermaid), ("dot", parse_dot)], ids=["mermaid", "dot"]
)
def test_graph_draws_tasks_that_use_pools_without_any_pool_defined(
    tmp_path: Path, fmt: str, parse: Callable[[str], Parsed]
) -> None:
    source = POOLED.format(timeout=1, pools="")
    done = flowing("graph", str(write(tmp_path, source)), "--format", fmt)
    assert done.returncode == 0, done.stderr
    assert set(by_name(parse(done.stdout)).nodes) == {"first", "second"}


@pytest.mark.parametrize(
    "fmt,parse", [("mermaid", parse_mermaid), ("dot", parse_dot)], ids=["mermaid", "dot"]
)
def test_graph_prints_the_graph_without_running_it(tmp_path: Path, fmt: str, parse) -> None:  # type: ignore[no-untyped-def]
    source = PIPELINE.replace("return [1, 2, 3]", "raise SystemExit('must not run')")
    done = flowing("graph", str(write(tmp_path, source)), "--format", fmt)
    assert done.returncode == 0, done.stderr
    picture = by_name(parse(done.stdout))
    assert picture.edges == {
        ("extract", "total", False),
        ("extract", "as_set", False),
        ("total", "alert", False),
    }


@pytest.mark.parametrize(
    "command",
    [["run", "--json", "--quiet"], ["run"], ["graph"]],
    ids=["run-json", "run-summary", "graph"],
)
def test_a_reader_that_closed_stdout_ends_the_output_quietly_keeping_the_status(
    tmp_path: Path, command: list[str]
) -> None:
    """``flowing run x.py --json | head -1``: no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "flowing", command[0], str(write(tmp_path, PIPELINE)), *command[1:]],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONWARNINGS": ""},
        )
    finally:
        os.close(write_end)
    assert (done.returncode, "Error" not in done.stderr) == (0, True), done.stderr


@pytest.mark.parametrize(
    "command",
    [["run", "--json", "--quiet"], ["run", "--quiet"], ["run"], ["graph"]],
    ids=["run-json", "run-quiet", "run-summary", "graph"],
)
def test_a_command_started_without_stdout_prints_nothing_and_keeps_the_status(
    tmp_path: Path, command: list[str]
) -> None:
    """``flowing run x.py >&-`` (fd 1 closed: Python's sys.stdout is None)."""
    args = [command[0], str(write(tmp_path, PIPELINE)), *command[1:]]
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -m flowing "$@" >&-', sys.executable, *args],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert (done.returncode, "Error" not in done.stderr) == (0, True), done.stderr


def test_version_prints_the_package_version() -> None:
    done = flowing("--version")
    assert (done.returncode, done.stdout) == (0, f"flowing {__version__}\n")


CYCLE = "@task\ndef c1(): pass\n@task(depends_on=[c1])\ndef c2(c1): pass\nc1.depends_on = (c2,)\n"
POOL_API = "from flowing import task\n@task(pool='api')\ndef a(): pass\n"

BAD_INPUTS = {
    "missing-file": (["run", "nope.py"], "", "no such file: 'nope.py'"),
    "folder-as-file": (["graph", "."], "", "'.' is a directory; give the Python file that defines the tasks"),
    "device-as-file": (["run", os.devnull], "", f"{os.devnull!r} is not a regular file"),
    "syntax-error": (["run", "bad.py"], "def broken(:\n", "cannot import bad.py: SyntaxError: "),
    "import-error": (["run", "bad.py"], "import not_a_module_xyz\n", "No module named 'not_a_module_xyz'"),
    "raises-on-import": (["run", "bad.py"], "x = 1\nraise RuntimeError('boom')\n", "bad.py (line 2): RuntimeError: boom"),
    "no-task": (["run", "bad.py"], "x = 1\n", "bad.py defines no task"),
    "unknown-task": (["run", "bad.py:nope"], PIPELINE, "has no task named 'nope'; its tasks are: alert, as_set"),
    "empty-task-list": (["run", "bad.py:"], PIPELINE, "no task name after ':'"),
    "bad-workers": (["run", "bad.py", "--max-workers", "0"], PIPELINE, "--max-workers: must be an int >= 1, got '0'"),
    "fresh-without-journal": (["run", "bad.py", "--fresh"], PIPELINE, "--fresh empties the journal: give it with --journal PATH"),
    "bad-timeout": (["run", "bad.py", "--timeout", "0"], PIPELINE, "--timeout: must be a number of seconds > 0, got '0'"),
    "infinite-timeout": (["run", "bad.py", "--timeout", "inf"], PIPELINE, "--timeout: must be a number of seconds > 0, got 'inf'"),
    "bad-backend": (["run", "bad.py", "--backend", "curio"], PIPELINE, "invalid choice: 'curio'"),
    "bad-format": (["graph", "bad.py", "--format", "png"], PIPELINE, "invalid choice: 'png'"),
    "bad-timeline": (["run", "bad.py", "--timeline", "run.gif"], PIPELINE, "must end in one of .png"),
    "no-journal-dir": (["run", "bad.py", "--journal", "no/such/dir/j"], PIPELINE, "--journal 'no/such/dir/j' cannot be used as a journal: its folder "),
    "journal-under-a-file": (["run", "bad.py", "--journal", "bad.py/j"], PIPELINE, "--journal 'bad.py/j' cannot be used as a journal: opening it to read and append failed (Not a directory)"),
    "journal-is-the-file": (["run", "bad.py", "--journal", "bad.py"], PIPELINE, "--journal 'bad.py' cannot be used as a journal: it is not empty and none of its lines is a journal record"),
    "cycle-free-but-bad-task": (["run", "bad.py"], "from flowing import task\n@task(retry=-1)\ndef a(): pass\n", "retry of task 'a' must be an int >= 0"),
    "no-command": ([], "", "the following arguments are required"),
    "cycle": (["run", "bad.py"], "from flowing import task\n" + CYCLE, "the tasks form a cycle: 'c2' -> 'c1' -> 'c2'"),
    "cycle-beside-a-task": (["graph", "bad.py"], "from flowing import task\n@task\ndef alone(): pass\n" + CYCLE, "the tasks form a cycle: 'c2' -> 'c1' -> 'c2'"),
    "undefined-pool": (["run", "bad.py"], POOL_API, "task 'a' uses pool 'api', which bad.py does not define; add POOLS = {'api': <size>} to bad.py or pass --pool api=SIZE"),
    "bad-POOLS": (["run", "bad.py"], POOL_API + "POOLS = {'api': 0}\n", "POOLS in bad.py: pool 'api' must be an int >= 1"),
    "pool-option-without-size": (["run", "bad.py", "--pool", "api"], POOL_API, "--pool: must be NAME=SIZE, got 'api'"),
    "pool-option-bad-size": (["run", "bad.py", "--pool", "api=0"], POOL_API, "--pool: must be an int >= 1, got '0'"),
    "pool-option-no-task-uses": (["run", "bad.py", "--pool", "api=1", "--pool", "apii=2"], POOL_API, "--pool apii: no task uses a pool of that name (used: api)"),
}


@pytest.mark.parametrize("args,source,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_clear_line_and_exit_2(
    tmp_path: Path, args: list[str], source: str, message: str
) -> None:
    if source:
        write(tmp_path, source, "bad.py")
    done = flowing(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("flowing")
    assert message in lines[0]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    write(tmp_path, "x = 1\nraise RuntimeError('boom')\n", "bad.py")
    done = flowing("run", "bad.py", "--debug", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1] == "flowing: error: cannot import bad.py (line 2): RuntimeError: boom"
