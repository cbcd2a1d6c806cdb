"""A small flow with one of each outcome, shared by the tests of what observes a run."""

from __future__ import annotations

from typing import Any

from flowing import Flow, task


def flaky_broken_report(on_event: Any = None, **options: Any) -> Flow:
    """``flaky`` fails its first attempt and succeeds on retry, ``broken`` fails with
    ``ValueError: bad row``, and ``report``, which needs it, is skipped."""
    calls = {"n": 0}

    @task(retry=1, retry_backoff_base_ms=0)
    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("first call fails")
        return 1

    @task(depends_on=[flaky])
    def broken(flaky: int) -> int:
        raise ValueError("bad row")

    @task(depends_on=[broken])
    def report(broken: int) -> None: ...

    return Flow(report, on_event=on_event, **options)
