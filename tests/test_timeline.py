"""timeline() draws the last run from the event stream, critical path highlighted."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from _flows import flaky_broken_report

from flowing import Flow, MissingExtraError, NoRunError, TaskDef, task
from flowing._graph import build_graph
from flowing._timeline import _critical_path, bars


def parse_gantt(text: str) -> dict[str, tuple[set[str], int, int, str]]:
    """label -> (tags, start, end, section), strictly: any other line fails the test."""
    lines = text.splitlines()
    assert lines[0] == "gantt"
    assert re.fullmatch(r"    title flowing run: (1 task|\d+ tasks) in \d+\.\d\d s", lines[1])
    assert lines[2] == "    dateFormat x"
    assert lines[3].startswith("    axisFormat ")
    bars: dict[str, tuple[set[str], int, int, str]] = {}
    section = ""
    for line in lines[4:]:
        if m := re.fullmatch(r"    section (\w+)", line):
            section = m[1]
        elif m := re.fullmatch(r"    ([^:]+) :((?:\w+, )*)n\d+, (\d+), (\d+)", line):
            tags = {t for t in m[2].split(", ") if t}
            start, end = int(m[3]), int(m[4])
            assert start < end
            bars[m[1]] = (tags, start, end, section)
        else:
            raise AssertionError(f"unexpected gantt line: {line!r}")
    return bars


def build_diamond() -> tuple[Flow, TaskDef[..., Any]]:
    """quick and slow both feed join; quick releases slow, so slow always ends last."""
    gate: list[anyio.Event] = []

    def release() -> anyio.Event:
        if not gate:
            gate.append(anyio.Event())
        return gate[0]

    @task
    async def quick() -> int:
        release().set()
        return 1

    @task
    async def slow() -> int:
        await release().wait()
        return 2

    @task(depends_on=[quick, slow])
    async def join(quick: int, slow: int) -> int:
        return quick + slow

    @task(depends_on=[join], when=lambda join: False)
    def gated(join: int) -> None: ...

    @task(depends_on=[join], detached=True)
    async def notify(join: int) -> None: ...

    return Flow(gated, join), slow


def test_the_gantt_follows_the_critical_path_through_the_last_dependency() -> None:
    flow, _ = build_diamond()
    flow.run()
    bars = parse_gantt(flow.timeline())
    assert {label: (tags, section) for label, (tags, _, _, section) in bars.items()} == {
        "slow": ({"crit"}, "main"),
        "quick": ({"done"}, "main"),
        "join": ({"crit"}, "main"),
        "gated (skipped)": (set(), "main"),
        "notify": ({"crit"}, "detached"),
    }
    assert bars["join"][1] >= bars["slow"][2] - 1  # bars are at least 1 ms long


@pytest.mark.parametrize(
    "name,label",
    [
        ("load_rows", "load_rows"),
        ("titles", "titles"),
        ("50% done", "50% done"),
        ("x:y;z#w", "x-y,z-w"),
        ("new\nline", "new line"),
        ("cr\rret\ttab", "cr ret tab"),
        ("line\u2028separator", "line separator"),
        ("title", "'title'"),
        ("Title x", "'Title x'"),
        ("section x", "'section x'"),
        ("excludes x", "'excludes x'"),
        ("dateFormat x", "'dateFormat x'"),
        ("axisFormat x", "'axisFormat x'"),
        ("todayMarker x", "'todayMarker x'"),
        ("tickInterval x", "'tickInterval x'"),
        ("weekday monday", "'weekday monday'"),
        ("click x", "'click x'"),
        ("topAxis", "'topAxis'"),
        ("2026-01-01 load", "'2026-01-01 load'"),
        ("   ", "'   '"),
        ("a%%b", "a\uff05\uff05b"),
        ("%x", "\uff05x"),
        ("a%b", "a\uff05b"),
        ("x %%{init}%%", "x \uff05\uff05{init}\uff05\uff05"),
    ],
)
def test_a_task_name_is_one_bar_whatever_mermaid_would_read_in_it(name: str, label: str) -> None:
    flow = Flow(task(lambda: None, name=name))
    flow.run()
    assert list(parse_gantt(flow.timeline())) == [label]


def test_an_image_draws_a_name_with_dollar_signs_as_text(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    flow = Flow(task(lambda: None, name="$\\frac$"))
    flow.run()
    flow.timeline(tmp_path / "run.svg")
    assert "frac" in (tmp_path / "run.svg").read_text(encoding="utf-8")


def test_only_the_latest_run_is_drawn() -> None:
    flow, _ = build_diamond()
    flow.run()
    flow.override(flow.tasks[0], 1)  # quick, kept: it does not run again
    flow.run()
    assert "quick" not in parse_gantt(flow.timeline())


def test_a_retried_task_has_one_bar_with_its_retry_inside() -> None:
    flow = flaky_broken_report()
    flow.run()
    bar = {bar.name: bar for bar in bars(flow._recorder, flow._graph)}["flaky"]
    assert (bar.state, len(bar.retries_ms)) == ("succeeded", 1)
    assert bar.start_ms <= bar.retries_ms[0] <= bar.end_ms


def test_a_mapped_step_bar_shows_its_instances_retries() -> None:
    failed: set[int] = set()

    @task
    def items() -> list[int]:
        return [1, 2]

    @task(depends_on=[items], map_over="items", retry=1, retry_backoff_base_ms=0)
    def each(items: int) -> int:
        if items not in failed:
            failed.add(items)
            raise ConnectionError("first call fails")
        return items

    flow = Flow(each)
    flow.run()
    by_name = {bar.name: bar for bar in bars(flow._recorder, flow._graph)}
    assert len(by_name["each"].retries_ms) == 2 and by_name["items"].retries_ms == ()


class _GrowsWhileIterated(dict[int, Any]):
    """What a run in another thread does to the recorder's results while Python code iterates them."""

    def items(self) -> Any:
        for key, value in super().items():  # as a real dict's: changed underfoot, it raises
            self[-1 - len(self)] = value
            yield key, value

    def __iter__(self) -> Any:
        return iter(self.items())


def test_the_timeline_reads_the_results_in_one_copy_that_a_run_in_another_thread_cannot_change() -> None:
    flow, _ = build_diamond()
    flow.run()
    drawn = bars(flow._recorder, flow._graph)
    flow._recorder.finished = _GrowsWhileIterated(flow._recorder.finished)

    assert bars(flow._recorder, flow._graph) == drawn


@pytest.mark.parametrize(
    "ends,expected",
    [
        ({}, set()),
        ({"a": 1.0, "b": 2.0, "join": 3.0}, {"b", "join"}),
        ({"a": 2.0, "b": 1.0, "join": 3.0}, {"a", "join"}),
        ({"a": 2.0, "b": 1.0}, {"a"}),
        ({"b": 1.0, "join": 3.0}, {"b", "join"}),
    ],
    ids=["nothing-ran", "b-last", "a-last", "join-never-ran", "a-was-kept"],
)
def test_the_critical_path_walks_back_through_the_latest_dependency(
    ends: dict[str, float], expected: set[str]
) -> None:
    a = task(lambda: 1, name="a")
    b = task(lambda: 2, name="b")

    @task(depends_on=[a, b])
    def join(a: int, b: int) -> int:
        return a + b

    graph = build_graph([join])
    index = {t.name: i for i, t in enumerate(graph.tasks)}
    path = _critical_path(graph, {index[name]: end for name, end in ends.items()})
    assert {graph.tasks[i].name for i in path} == expected


def test_a_timeline_before_any_run_is_an_error() -> None:
    with pytest.raises(NoRunError, match=r"timeline\(\) needs a finished run"):
        build_diamond()[0].timeline()


@pytest.mark.parametrize(
    "suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".mmd", b"gantt")]
)
def test_the_timeline_is_written_by_suffix(tmp_path: Path, suffix: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    flow, _ = build_diamond()
    flow.run()
    path = tmp_path / f"run{suffix}"
    text = flow.timeline(path)
    assert path.read_bytes().startswith(magic)
    assert text.startswith("gantt")


@pytest.mark.parametrize("path", [3, b"run.png", ["run.png"]], ids=["int", "bytes", "list"])
def test_a_path_of_the_wrong_type_is_refused_naming_the_argument(path: object) -> None:
    flow, _ = build_diamond()
    flow.run()
    with pytest.raises(TypeError) as caught:
        flow.timeline(path)  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"timeline(path) takes a file path (a str or os.PathLike) such as 'run.png' or "
        f"'run.mmd', got {path!r}"
    )


def test_an_unknown_suffix_is_refused(tmp_path: Path) -> None:
    flow, _ = build_diamond()
    flow.run()
    with pytest.raises(ValueError, match=r"must end in one of \.png, \.svg"):
        flow.timeline(tmp_path / "run.gif")


def test_an_image_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    flow, _ = build_diamond()
    flow.run()
    with pytest.raises(MissingExtraError, match=r"pip install 'flowing\[plot\]'"):
        flow.timeline(tmp_path / "run.png")


@pytest.mark.parametrize(("count", "title"), [(1, "1 task"), (2, "2 tasks")])
def test_the_title_counts_the_tasks_in_good_english(count: int, title: str) -> None:
    flow = Flow(*[task(name=f"t{k}")(lambda: None) for k in range(count)])
    flow.run()
    assert flow.timeline().splitlines()[1].startswith(f"    title flowing run: {title} in ")
