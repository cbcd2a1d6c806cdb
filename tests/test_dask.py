"""DaskExecutor on a real LocalCluster: 2 worker processes, 1 thread each, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import distributed
import pytest

import anyio

from flowing import (
    Event,
    ExecutorAddressError,
    ExecutorBackendError,
    ExecutorUnreachableError,
    Flow,
    InstanceFinished,
    RemoteTaskLostError,
    StepResult,
    StepState,
    TaskDef,
    TaskFinished,
    TaskRetrying,
    TaskSerializationError,
    task,
)

from flowing.dask import DaskExecutor

WORKERS = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One cluster, started once: only this module uses it, so it stops with the module.

    ``allowed-failures: 0`` makes a dead worker fail the task at once, so the retry
    seen in the tests is flowing's, not Dask's."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        local = distributed.LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        )
    with local, distributed.Client(local, set_as_default=False) as client:
        client.run(os.getpid)  # every worker answers
        yield local


@pytest.fixture
def client(cluster: Any) -> Iterator[Any]:
    """A sync client on the cluster, once both workers are (back) up."""
    with distributed.Client(cluster, set_as_default=False) as sync_client:
        sync_client.wait_for_workers(WORKERS, timeout=30)
        yield sync_client


def scheduler_keys(client: Any, prefix: str) -> list[str]:
    keys = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))
    return [k for k in keys if str(k).startswith(prefix)]


def held_until_released(started: Path, release: Path) -> None:
    """In a body on a worker: mark ``started``, then wait for the test to create
    ``release``, 20 s at the most (Dask cannot interrupt a worker thread). The
    workers import it from this module, which the cluster's processes can import."""
    started.touch()
    deadline = time.monotonic() + 20
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def run_retried(step: TaskDef[..., Any], client: Any) -> tuple[StepResult, list[TaskRetrying]]:
    """Run ``step`` (and what it depends on) on the cluster: its result, and the
    retries announced on the way."""
    events: list[Event] = []
    flow = Flow(step, executor=DaskExecutor(client), on_event=events.append)
    result = flow.run(timeout_s=60)[step.name]
    return result, [e for e in events if isinstance(e, TaskRetrying)]


def wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def burn_cpu(seconds: float) -> None:
    """Pure-Python work measured in this thread's own CPU time: the GIL cannot share it."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        sum(range(1000))


def mixed_graph() -> Any:
    @task
    def numbers() -> list[int]:
        return [3, 1, 2]

    @task(depends_on=[numbers])
    async def sorted_numbers(numbers: list[int]) -> list[int]:
        return sorted(numbers)

    @task(depends_on=[numbers])
    def total(numbers: list[int]) -> int:
        return sum(numbers)

    @task(depends_on=[numbers], local=True)
    def where(numbers: list[int]) -> int:
        return os.getpid()

    @task(depends_on=[total], when=lambda total: total > 100)
    def big(total: int) -> str:
        return "big"

    @task(depends_on=[total])
    def broken(total: int) -> None:
        raise ValueError(f"cannot use {total}")

    @task(depends_on=[sorted_numbers, total, where])
    def report(sorted_numbers: list[int], total: int, where: int) -> dict[str, Any]:
        return {"sorted": sorted_numbers, "total": total, "pid": os.getpid()}

    return report, big, broken


def outcome(results: dict[str, Any]) -> dict[str, Any]:
    return {
        name: (r.state, r.value, type(r.error).__name__, str(r.error), r.attempts)
        for name, r in results.items()
    }


@pytest.mark.parametrize("form", ["address", "client", "cluster"])
def test_a_mixed_graph_gives_the_same_results_on_dask_as_in_process(
    cluster: Any, client: Any, form: str
) -> None:
    target = {"address": cluster.scheduler_address, "client": client, "cluster": cluster}[form]
    here = Flow(*mixed_graph(), fail_fast=False).run()
    remote = Flow(*mixed_graph(), fail_fast=False, executor=DaskExecutor(target)).run()

    worker_pids = set(client.run(os.getpid).values())
    assert here["report"].value.pop("pid") == os.getpid()
    assert remote["report"].value.pop("pid") in worker_pids
    assert here["where"].value == remote["where"].value == os.getpid()
    assert outcome(remote) == outcome(here)
    assert remote["big"].state is StepState.SKIPPED
    assert remote["broken"].state is StepState.FAILED


def test_cpu_bound_pure_python_bodies_run_in_parallel_on_two_worker_processes(
    client: Any,
) -> None:
    """Four 1 s bodies take about two solo runs, not four: the GIL is not in the way.

    The bound is relative to one body run alone just before, so that other load
    on this 2-core machine slows both sides alike; serial would be 4x.
    """

    def burners(count: int) -> list[Any]:
        def make(i: int) -> Any:
            @task(name=f"burn_{i}")
            def burn() -> int:
                burn_cpu(1.0)
                return os.getpid()

            return burn

        return [make(i) for i in range(count)]

    def timed_run(count: int) -> tuple[float, dict[str, Any]]:
        start = time.monotonic()
        results = Flow(*burners(count), executor=DaskExecutor(client)).run()
        return time.monotonic() - start, results

    timings = []
    for _ in range(3):  # best of three: load from elsewhere can only make a run slower
        solo, _ = timed_run(1)
        elapsed, results = timed_run(4)
        assert all(r.state is StepState.SUCCEEDED for r in results.values())
        assert len({r.value for r in results.values()}) == 2
        timings.append((round(elapsed, 2), round(solo, 2)))
        if elapsed < 3.5 * solo:
            return
    message = f"4 bodies vs one alone took (s): {timings}; serial would be 4x"
    if os.getloadavg()[0] > 2 * (os.cpu_count() or 1):
        pytest.skip(f"the machine is too busy to measure a speedup ({message})")
    pytest.fail(message)


_LOCK = threading.Lock()


@task
def returns_a_lock() -> Any:
    return threading.Lock()


@task
def closes_over_a_lock() -> bool:
    return _LOCK.locked() and False


@task(local=True)
def local_lock() -> Any:
    return threading.Lock()


@task(depends_on=[local_lock])
def takes_a_lock(local_lock: Any) -> bool:
    return bool(local_lock)


@pytest.mark.parametrize(
    ("terminal", "culprit", "what"),
    [
        (closes_over_a_lock, "closes_over_a_lock", "its function or its inputs"),
        (takes_a_lock, "takes_a_lock", "its function or its inputs"),
        (returns_a_lock, "returns_a_lock", "its return value"),
    ],
    ids=["body", "input", "value"],
)
def test_what_cannot_be_serialised_fails_that_task_clearly(
    client: Any, terminal: Any, culprit: str, what: str
) -> None:
    results = Flow(terminal, executor=DaskExecutor(client)).run(timeout_s=30)
    result = results[culprit]
    assert result.state is StepState.FAILED
    assert isinstance(result.error, TaskSerializationError)
    assert f"task {culprit!r}: {what} cannot be serialised" in str(result.error)
    assert "@task(local=True)" in str(result.error)


class RebuildFails:
    """Pickles here; unpickling it anywhere raises."""

    def __reduce__(self) -> Any:
        return (_cannot_rebuild, ())


def _cannot_rebuild() -> None:
    raise RuntimeError("cannot rebuild RebuildFails")


class RebuildFailsElsewhere:
    """Unpickles in this process (where the LocalCluster's scheduler runs), not on a worker."""

    def __getstate__(self) -> dict[str, int]:
        return {"pid": os.getpid()}

    def __setstate__(self, state: dict[str, int]) -> None:
        if state["pid"] != os.getpid():
            raise RuntimeError("cannot rebuild RebuildFailsElsewhere in another process")


ONLY_HERE = "class OnlyHere:\n    pass\n"


def only_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """An instance of a class from a module this process imports and no worker can."""
    (tmp_path / "flowing_only_here.py").write_text(ONLY_HERE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flowing_only_here", raising=False)
    import flowing_only_here  # type: ignore[import-not-found]

    return flowing_only_here.OnlyHere()


UNPICKLABLE_ON_WORKERS = {
    "raises anywhere": (
        lambda tmp_path, monkeypatch: RebuildFails(),
        "RuntimeError: cannot rebuild RebuildFails",
    ),
    "raises on a worker": (
        lambda tmp_path, monkeypatch: RebuildFailsElsewhere(),
        "RuntimeError: cannot rebuild RebuildFailsElsewhere in another process",
    ),
    "class of a module only here": (
        only_here,
        "ModuleNotFoundError: No module named 'flowing_only_here'",
    ),
}


@pytest.mark.parametrize(
    ("make", "cause"), UNPICKLABLE_ON_WORKERS.values(), ids=UNPICKLABLE_ON_WORKERS.keys()
)
def test_an_input_the_cluster_cannot_unpickle_fails_that_task_naming_the_cause(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Any, cause: str
) -> None:
    """At once, with the workers' connections intact: before, a worker that could not
    unpickle the task lost its connection, and the task was retried on the others."""

    @task(local=True)
    def made_here() -> object:
        return make(tmp_path, monkeypatch)

    @task(depends_on=[made_here])
    def takes_it(made_here: object) -> str:
        return "never runs"

    @task
    def after() -> int:
        return os.getpid()

    workers_before = set(client.scheduler_info()["workers"])
    results = Flow(takes_it, after, fail_fast=False, executor=DaskExecutor(client)).run(
        timeout_s=30
    )
    result = results["takes_it"]
    assert result.state is StepState.FAILED
    assert isinstance(result.error, TaskSerializationError)
    assert str(result.error).startswith(
        f"task 'takes_it': its function or its inputs cannot be deserialised on the "
        f"cluster ({cause}); make sure it unpickles there"
    )
    assert "@task(local=True)" in str(result.error)
    assert results["after"].state is StepState.SUCCEEDED
    assert set(client.scheduler_info()["workers"]) == workers_before


def test_an_input_the_cluster_cannot_unpickle_is_retried_like_any_failure(client: Any) -> None:
    """``retry=`` resubmits it (another worker may have what this one lacks); every
    attempt fails the same way here, and the last error is the task's."""

    @task(local=True)
    def made_here() -> object:
        return RebuildFails()

    @task(depends_on=[made_here], retry=1, retry_backoff_base_ms=0)
    def takes_it(made_here: object) -> str:
        return "never runs"

    result, retries = run_retried(takes_it, client)
    assert (result.state, result.attempts, type(result.error)) == (
        StepState.FAILED, 2, TaskSerializationError
    )
    assert [type(e.error) for e in retries] == [TaskSerializationError]


@pytest.mark.parametrize("limit", ["task timeout_s", "run timeout_s"])
def test_a_timeout_cancels_the_remote_future(
    client: Any, tmp_path: Path, limit: str
) -> None:
    started, release = tmp_path / "started", tmp_path / "release"

    # 2 s: time enough for the body to start on a worker even on a busy machine
    @task(timeout_s=2.0 if limit == "task timeout_s" else None)
    def stuck() -> str:
        held_until_released(started, release)
        return "too late"

    flow = Flow(stuck, executor=DaskExecutor(client))
    try:
        if limit == "task timeout_s":
            result = flow.run()["stuck"]
            assert (result.state, type(result.error)) == (StepState.FAILED, TimeoutError)
        else:
            with pytest.raises(TimeoutError):
                flow.run(timeout_s=2.0)
            assert flow.results["stuck"].state is StepState.CANCELLED
        assert started.exists(), "the body never started on a worker"
        assert wait_until(lambda: not scheduler_keys(client, "stuck-"))
    finally:
        release.touch()  # let the worker thread, which Dask cannot interrupt, return


def test_a_worker_dying_mid_task_is_a_retried_failure(client: Any, tmp_path: Path) -> None:
    died = tmp_path / "died"

    @task(retry=1, retry_backoff_base_ms=0)
    def fragile() -> int:
        if not died.exists():
            died.touch()
            os._exit(1)
        return os.getpid()

    result, retries = run_retried(fragile, client)
    assert (result.state, result.attempts) == (StepState.SUCCEEDED, 2)
    assert [type(e.error).__name__ for e in retries] == ["KilledWorker"]
    assert "fragile-" in str(retries[0].error)


def test_the_trio_backend_is_refused_with_a_clear_error(client: Any) -> None:
    @task
    def anything() -> int:
        return 1

    flow = Flow(anything, executor=DaskExecutor(client))
    with pytest.raises(ExecutorBackendError, match="needs asyncio") as raised:
        flow.run(backend="trio")
    result = flow.results["anything"]
    assert (result.state, result.reason) == (StepState.CANCELLED, f"not started: {raised.value}")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_asynchronous_client_on_the_running_loop_is_used_and_left_open(
    cluster: Any, anyio_backend: str
) -> None:
    @task
    def pid() -> int:
        return os.getpid()

    async with distributed.Client(
        cluster.scheduler_address, asynchronous=True, set_as_default=False
    ) as async_client:
        results = await Flow(pid, executor=DaskExecutor(async_client)).arun()
        assert results["pid"].value != os.getpid()
        assert async_client.status == "running"


@pytest.mark.parametrize("bad", [42, None, ""], ids=repr)
def test_dask_executor_needs_an_address_a_client_or_a_cluster(bad: Any) -> None:
    with pytest.raises(TypeError, match="scheduler address"):
        DaskExecutor(bad)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("nonsense-address", "missing port number"),
        ("tcp://10.0.0.5", "missing port number"),
        ("http://10.0.0.5:8786", "unknown address scheme 'http'"),
        ("tcp://10.0.0.5:port", "invalid literal"),
    ],
    ids=["no scheme or port", "no port", "http", "port not a number"],
)
def test_an_address_dask_cannot_parse_is_refused_when_the_executor_is_built(
    address: str, problem: str
) -> None:
    with pytest.raises(ExecutorAddressError) as raised:
        DaskExecutor(address)
    message = str(raised.value)
    assert message.startswith(f"DaskExecutor cannot use the scheduler address {address!r}: ")
    assert problem in message
    assert "'tcp://host:port'" in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("address_form", ["tcp://127.0.0.1:{}", "127.0.0.1:{}"])
def test_an_unreachable_cluster_fails_the_run_and_each_task_records_why_it_never_ran(
    address_form: str,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = address_form.format(probe.getsockname()[1])

    @task
    def first() -> int:
        return 1

    @task(depends_on=[first])
    def second(first: int) -> int:
        return first + 1

    flow = Flow(second, executor=DaskExecutor(address))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ExecutorUnreachableError) as raised:
            flow.run(timeout_s=60)
    message = str(raised.value)
    assert message.startswith(f"DaskExecutor could not reach the scheduler at {address!r}")
    assert isinstance(raised.value.__cause__, OSError)
    assert isinstance(raised.value, ConnectionError)
    assert {name: (r.state, r.reason) for name, r in flow.results.items()} == {
        name: (StepState.CANCELLED, f"not started: {message}") for name in ("first", "second")
    }


def test_a_journal_replays_what_ran_on_the_cluster(client: Any, tmp_path: Path) -> None:
    @task
    def remote_pid() -> int:
        return os.getpid()

    journal = tmp_path / "run.jsonl"
    first = Flow(remote_pid, executor=DaskExecutor(client), journal_path=journal).run()
    again = Flow(remote_pid, executor=DaskExecutor(client), journal_path=journal).run()
    assert first["remote_pid"].value != os.getpid()
    assert (again["remote_pid"].value, again["remote_pid"].cached) == (
        first["remote_pid"].value,
        True,
    )


CLI_PIPELINE = '''
import os
from flowing import task

def helper(n):
    return n * 2

@task
def where():
    return os.getpid()

@task(depends_on=[where])
def doubled(where):
    return helper(21)
'''


def test_the_cli_runs_a_file_on_the_cluster_with_dask(
    cluster: Any, client: Any, tmp_path: Path
) -> None:
    (tmp_path / "pipeline.py").write_text(CLI_PIPELINE)
    done = subprocess.run(
        [sys.executable, "-m", "flowing", "run", "pipeline.py", "--dask",
         cluster.scheduler_address, "--json", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    tasks = json.loads(done.stdout)["tasks"]
    assert tasks["where"]["value"] in set(client.run(os.getpid).values())
    assert tasks["doubled"]["value"] == 42


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "trio"], "--dask needs --backend asyncio"),
        (["--dask", "nonsense"], "DaskExecutor cannot use the scheduler address 'nonsense'"),
        ([], "DaskExecutor could not reach the scheduler at 'tcp://127.0.0.1:1'"),
    ],
    ids=["trio", "bad address", "unreachable"],
)
def test_the_cli_refuses_dask_options_it_cannot_honour(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    (tmp_path / "pipeline.py").write_text(CLI_PIPELINE)
    done = subprocess.run(
        [sys.executable, "-m", "flowing", "run", "pipeline.py", "--dask", "tcp://127.0.0.1:1",
         *extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"},
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith(f"flowing: error: {message}"), done.stderr
    assert "Traceback" not in done.stderr


def test_a_future_cancelled_outside_flowing_fails_the_attempt_clearly(
    client: Any, tmp_path: Path
) -> None:
    started, release = tmp_path / "started", tmp_path / "release"

    @task
    def lost() -> str:
        held_until_released(started, release)
        return "never seen"

    flow = Flow(lost, executor=DaskExecutor(client))
    runner = threading.Thread(target=flow.run, kwargs={"timeout_s": 30})
    runner.start()
    try:
        assert wait_until(started.exists)
        keys = scheduler_keys(client, "lost-")
        client.cancel([distributed.Future(key, client) for key in keys], force=True)
        runner.join(timeout=20)
    finally:
        release.touch()
    result = flow.results["lost"]
    assert result.state is StepState.FAILED
    assert isinstance(result.error, RemoteTaskLostError)
    assert "task 'lost'" in str(result.error)


SLEEPERS = 6


def sleepers(tmp_path: Path) -> list[Any]:
    """Sync tasks that leave a marker when their body starts, then wait for ``release``."""

    def make(i: int) -> Any:
        @task(name=f"sleeper_{i}")
        def sleeper() -> int:
            held_until_released(tmp_path / f"ran-{i}", tmp_path / "release")
            return i

        return sleeper

    return [make(i) for i in range(SLEEPERS)]


def bodies_run(tmp_path: Path) -> set[str]:
    return {f"sleeper_{p.name.removeprefix('ran-')}" for p in tmp_path.glob("ran-*")}


def got_a_result_on_the_cluster(client: Any, names: set[str], since: float) -> set[str]:
    """The tasks among ``names`` whose Dask key got a result on the cluster after ``since``."""

    def finishes(dask_scheduler: Any) -> list[tuple[str, str]]:
        log = dask_scheduler.transition_log
        return [(str(t.key), t.finish) for t in log if t.timestamp >= since]

    return {
        name
        for key, finish in client.run_on_scheduler(finishes)
        for name in names
        if key.startswith(f"{name}-") and finish in ("memory", "erred")
    }


@pytest.mark.parametrize("fail_fast", [True, False], ids=["fail_fast", "no_fail_fast"])
def test_fail_fast_cancels_the_futures_whose_bodies_had_not_started(
    client: Any, tmp_path: Path, fail_fast: bool
) -> None:
    """Two sleepers hold the two worker threads when boom fails. With fail_fast the
    four others, queued on the cluster, are cancelled there and SKIPPED; without it
    every sleeper runs. The two that started always finish and keep their value."""

    @task(local=True)
    def boom() -> None:
        assert wait_until(lambda: len(bodies_run(tmp_path)) == WORKERS, timeout_s=30)
        raise RuntimeError("boom")

    # Release the two running sleepers once every other task has its final result.
    settled, expected = [], 1 + (SLEEPERS - WORKERS if fail_fast else 0)

    def release_when_settled(event: Any) -> None:
        if isinstance(event, TaskFinished) and not event.result.succeeded:
            settled.append(event.task)
            if len(settled) == expected:
                (tmp_path / "release").touch()

    flow = Flow(
        *sleepers(tmp_path),
        boom,
        fail_fast=fail_fast,
        executor=DaskExecutor(client),
        on_event=release_when_settled,
    )
    since, start = time.time(), time.monotonic()
    results = flow.run(timeout_s=60)
    elapsed = time.monotonic() - start

    names = {f"sleeper_{i}" for i in range(SLEEPERS)}
    ran = bodies_run(tmp_path)
    assert results["boom"].state is StepState.FAILED
    assert len(ran) == (WORKERS if fail_fast else SLEEPERS)
    for name in ran:
        assert (results[name].state, results[name].value) == (
            StepState.SUCCEEDED,
            int(name.removeprefix("sleeper_")),
        )
    for name in names - ran:
        assert (results[name].state, results[name].attempts) == (StepState.SKIPPED, 0)
        assert results[name].reason == "not started: fail_fast stopped the run after 'boom' failed"
    assert got_a_result_on_the_cluster(client, names, since) == ran  # the others were cancelled
    assert elapsed < 15, f"the run took {elapsed:.1f} s"  # the sleepers give up after 20 s


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cancelling_the_run_cancels_every_submitted_future(
    client: Any, tmp_path: Path, anyio_backend: str
) -> None:
    @task(local=True)
    def both_busy() -> None:
        assert wait_until(lambda: len(bodies_run(tmp_path)) == WORKERS, timeout_s=30)

    with anyio.CancelScope() as scope:

        def cancel_when_both_busy(event: Any) -> None:
            if isinstance(event, TaskFinished) and event.task == "both_busy":
                scope.cancel()

        flow = Flow(
            *sleepers(tmp_path), both_busy, executor=DaskExecutor(client),
            on_event=cancel_when_both_busy,
        )
        await flow.arun()
    try:
        sleeper_states = {r.state for n, r in flow.results.items() if n != "both_busy"}
        assert sleeper_states == {StepState.CANCELLED}
        assert await anyio.to_thread.run_sync(
            wait_until, lambda: not scheduler_keys(client, "sleeper_")
        )
        assert len(bodies_run(tmp_path)) == WORKERS
    finally:
        (tmp_path / "release").touch()  # let the worker threads, which Dask cannot stop, return


def test_what_flowing_sends_to_the_workers_unpickles_without_flowing_there() -> None:
    import cloudpickle

    from flowing.dask import _call_on_worker, _forget, _halt_on_worker

    sent = [
        _call_on_worker("halted", "not unpickled"),
        _halt_on_worker("run", ["key"]),
        _forget(["run"]),
    ]
    unpickle = (
        "import pickle, sys; sys.modules['flowing'] = None; "  # import flowing now fails
        "print(len(pickle.load(sys.stdin.buffer)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", unpickle],
        input=cloudpickle.dumps(sent), capture_output=True, timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, b"3"), done.stderr.decode()


def test_fail_fast_in_a_mapping_cancels_its_instances_whose_bodies_had_not_started(
    client: Any, tmp_path: Path
) -> None:
    """Instance 0 fails (its gate, in this process) once two other instances hold the
    two worker threads: the three more, queued on the cluster, are cancelled there
    and SKIPPED naming the mapping's stop; the two that started finish and keep
    their value. The run itself never halts: only the mapping stops them."""
    elements = list(range(SLEEPERS))

    @task
    def items() -> list[int]:
        return elements

    async def unless_first(items: int) -> bool:
        if items == 0:
            both_busy = lambda: len(list(tmp_path.glob("ran-*"))) == WORKERS  # noqa: E731
            assert await anyio.to_thread.run_sync(wait_until, both_busy, 30.0)
            raise RuntimeError("boom")
        return True

    @task(depends_on=[items], map_over="items", when=unless_first)
    def sleeper(items: int) -> int:
        held_until_released(tmp_path / f"ran-{items}", tmp_path / "release")
        return items

    # Release the two running instances once every other instance has its final result.
    instances: dict[int, Any] = {}

    def release_when_settled(event: Any) -> None:
        if isinstance(event, InstanceFinished):
            instances[event.item] = event.result
            if sum(not r.succeeded for r in instances.values()) == SLEEPERS - WORKERS:
                (tmp_path / "release").touch()

    flow = Flow(sleeper, executor=DaskExecutor(client), on_event=release_when_settled)
    since = time.time()
    flow.run(timeout_s=60)

    ran = {int(p.name.removeprefix("ran-")) for p in tmp_path.glob("ran-*")}
    assert len(ran) == WORKERS and 0 not in ran
    assert instances[0].state is StepState.FAILED
    for k in ran:
        assert (instances[k].state, instances[k].value) == (StepState.SUCCEEDED, k)
    for k in set(elements) - ran - {0}:
        assert (instances[k].state, instances[k].attempts, instances[k].reason) == (
            StepState.SKIPPED,
            0,
            "not started: fail_fast stopped the mapping after 'sleeper[0]' failed",
        )
    names = {f"sleeper[{k}]" for k in elements}
    assert got_a_result_on_the_cluster(client, names, since) == {f"sleeper[{k}]" for k in ran}


def test_a_large_buffer_input_travels_beside_the_pickled_body_not_inside_it(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input whose pickle hands out its buffer (a NumPy array does) is not copied
    into the bytes flowing pickles: it travels as a frame of its own, and the body
    gets it writable, as in this process."""
    import pickle

    import cloudpickle

    import flowing.dask

    class Blob:  # defined here: cloudpickle sends it by value
        def __init__(self, data: Any) -> None:
            self.data = data

        def __reduce_ex__(self, protocol: Any) -> Any:
            return (Blob, (pickle.PickleBuffer(self.data) if protocol >= 5 else self.data,))

    pickled: list[int] = []

    def dumps(obj: Any, **options: Any) -> bytes:
        payload: bytes = cloudpickle.dumps(obj, **options)
        pickled.append(len(payload))
        return payload

    monkeypatch.setattr(flowing.dask, "cloudpickle", types.SimpleNamespace(dumps=dumps))
    size = 8_000_000

    @task(local=True)
    def blob() -> Blob:
        return Blob(bytearray(b"\x01" * size))

    @task(depends_on=[blob])
    def ones(blob: Blob) -> int:
        blob.data[0] = 0  # a body may write to its inputs, as it may in this process
        return bytes(blob.data).count(b"\x01")

    result = Flow(ones, executor=DaskExecutor(client)).run(timeout_s=30)["ones"]
    assert (result.state, result.error, result.value) == (StepState.SUCCEEDED, None, size - 1)
    assert max(pickled) < size // 100
