"""Static typing of the public API, checked by running mypy --strict on user code.

Tasks are generic in their return type: ``flow.value(t)`` has t's type (an async
task's awaited type), and a decorated function keeps its signature for direct calls.
Lines marked ``# error`` must be rejected, every other line accepted.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

USER_CODE = textwrap.dedent(
    """
    from typing_extensions import assert_type

    import flowing
    from flowing import EventStream, Flow, StepResult, TaskDef, TaskFinished, task

    @task
    def load() -> list[int]:
        return [1, 2, 3]

    @task(depends_on=[load], retry=1)
    def total(load: list[int]) -> int:
        return sum(load)

    @task(depends_on=[total])
    async def report(total: int) -> str:
        return f"total={total}"

    flow = Flow(report, max_workers=2)
    assert_type(load, TaskDef[[], list[int]])
    assert_type(total([1, 2]), int)
    assert_type(flow.run(), dict[str, StepResult])
    assert_type(flow.value(load), list[int])
    assert_type(flow.value(total), int)
    assert_type(flow.value(report), str)
    flow.override(total, 6)
    flow.override(report, "total=6")
    flow.override(report, 6)  # error

    total("not a list")  # error
    total([1], extra=True)  # error
    as_text: str = flow.value(total)  # error
    awaited: str = report(1)  # error
    Flow(report, max_workers="2")  # error

    stream: EventStream = flow.events()  # names imported on first use are typed too

    def finished_value(event: TaskFinished) -> StepResult:
        return event.result

    typo: object = flowing.Flwo  # error

    from collections.abc import AsyncIterator, Callable
    from contextlib import asynccontextmanager
    from typing import Any

    class InlineRunner:  # a third-party executor, typed with public names only
        def __init__(self, threads: flowing.RunThreads) -> None:
            self.threads = threads

        async def run(
            self, task: TaskDef[..., Any], kwargs: dict[str, Any], on_abandon: Callable[[], None]
        ) -> Any:
            if self.threads.halt_reason is not None:
                raise flowing.HeldBack(self.threads.halt_reason)
            return task.fn(**kwargs)

    class InlineExecutor:
        @asynccontextmanager
        async def session(self, threads: flowing.RunThreads) -> AsyncIterator[flowing.BodyRunner]:
            yield InlineRunner(threads)

    Flow(report, executor=InlineExecutor())
    flowing.HeldBack(1)  # error
    """
)


def test_mypy_strict_accepts_typed_usage_and_rejects_type_errors(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(USER_CODE)
    stdout, stderr, _ = mypy_api.run(
        [
            str(source),
            "--strict",
            "--no-error-summary",
            "--hide-error-context",
            "--cache-dir",
            str(tmp_path / "mypy_cache"),
        ]
    )

    flagged = sorted({int(n) for n in re.findall(r"user_code\.py:(\d+): error", stdout)})
    expected = [n for n, line in enumerate(USER_CODE.splitlines(), 1) if line.endswith("# error")]
    assert stderr == ""
    assert flagged == expected, stdout


def test_the_package_declares_itself_typed() -> None:
    import flowing

    assert (Path(flowing.__file__).parent / "py.typed").is_file()
