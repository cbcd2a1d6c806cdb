"""The ``flowing`` command: run or draw the tasks of a Python file.

    flowing run FILE.py[:TASK,...] [--max-workers N] [--no-fail-fast] [--journal PATH]
                [--fresh] [--timeout SECONDS] [--backend asyncio|trio] [--timeline PATH]
                [--quiet] [--json] [--debug] [--dask ADDRESS] [--pool NAME=SIZE ...]
    flowing graph FILE.py[:TASK,...] [--format mermaid|dot]
    flowing --version

The pools a file's tasks name with ``pool=`` come from the file's module-level
``POOLS`` dict (the ``Flow(pools=...)`` argument), with ``--pool NAME=SIZE`` setting a
pool's size on top; drawing the graph needs no pools.

Exit status: 0 when every task succeeded or was skipped by a ``when=`` gate (its own
or an upstream task's), 1 when a task failed or was cancelled (``--timeout`` cancels
the unfinished ones), 2 for bad input (one line on stderr, no traceback unless
``--debug``), including a ``--timeline`` file that could not be written after a run
whose tasks all succeeded, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from . import __version__
from ._exceptions import (
    ExecutorAddressError,
    ExecutorUnreachableError,
    FlowDefinitionError,
    FlowTimeoutError,
    InvalidJournalError,
    InvalidPoolError,
    MissingExtraError,
    StepKeyError,
    UnknownPoolError,
)
from ._flow import Flow
from ._graph import build_graph
from ._pools import Pool, check_pools
from ._progress import print_summary
from ._render import to_dot, to_mermaid
from ._results import StepResult, StepState, count_states, describe_error
from ._task import TaskDef
from ._timeline import IMAGE_SUFFIXES, TEXT_SUFFIXES

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _BadInput(Exception):
    """Raised for input the command cannot use; main() prints it as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowing`` console script; returns the exit status."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): print to nowhere
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        status: int = args.command(args)
        return status
    except _BadInput as error:
        return _bad_input(str(error), args.debug)
    except (FlowDefinitionError, MissingExtraError, StepKeyError) as error:
        return _bad_input(str(error), args.debug)
    except (ExecutorAddressError, ExecutorUnreachableError) as error:  # --dask ADDRESS
        return _bad_input(str(error), args.debug)
    except KeyboardInterrupt:
        print("flowing: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _bad_input(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"flowing: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flowing", description="Run or draw the @task functions of a Python file."
    )
    parser.add_argument("--version", action="version", version=f"flowing {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "target",
        metavar="FILE.py[:TASK,...]",
        help="a Python file; optionally the terminal tasks to use, else every task nothing depends on",
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(title="commands", required=True, parser_class=_Parser)

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run the tasks, with live progress",
        epilog="pools: the tasks' pool= names are defined by a module-level POOLS dict in "
        "the file, e.g. POOLS = {'api': 4}; --pool sets a size on top. "
        "exit status: 0 every task succeeded or was skipped by a when= gate (its own or an "
        "upstream task's), 1 a task failed (or was skipped because of a failure, or cancelled), "
        "2 bad input (or an unwritable --timeline after a run that succeeded), 130 interrupted",
    )
    run.add_argument("--max-workers", type=_positive_int, default=5, metavar="N",
                     help="threads for sync tasks (default 5)")
    run.add_argument("--no-fail-fast", action="store_true",
                     help="keep starting independent tasks after a failure")
    run.add_argument("--journal", type=Path, metavar="PATH",
                     help="replay successes recorded in PATH and record new ones")
    run.add_argument("--fresh", action="store_true",
                     help="empty the --journal first: run every task again")
    run.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS",
                     help="cancel what is unfinished after SECONDS (exit status 1)")
    run.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio",
                     help="the event loop (default asyncio)")
    run.add_argument("--timeline", type=Path, metavar="PATH",
                     help="write the run's Gantt chart: .png/.svg/.pdf (matplotlib) or .mmd")
    run.add_argument("--quiet", action="store_true", help="no progress and no summary")
    run.add_argument("--json", action="store_true",
                     help="print the results as JSON on stdout (non-JSON values as repr, "
                     "'<unrepresentable TYPE>' if that fails)")
    run.add_argument("--dask", metavar="ADDRESS",
                     help="run sync task bodies on the Dask scheduler at ADDRESS (flowing[dask])")
    run.add_argument("--pool", type=_pool_size, action="append", default=[], metavar="NAME=SIZE",
                     help="at most SIZE attempts at once in the pool NAME (repeatable); "
                     "overrides the size in the file's POOLS, keeping its rate")
    run.set_defaults(command=_run)

    graph = commands.add_parser("graph", parents=[common], help="print the graph as text")
    graph.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    graph.set_defaults(command=_graph)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _pool_size(text: str) -> tuple[str, int]:
    name, equals, size = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"must be NAME=SIZE, got {text!r}")
    return name.strip(), _positive_int(size)


def _run(args: argparse.Namespace) -> int:
    _check_run_options(args)
    file, names = _split_target(args.target)
    module = _import_file(file)
    terminals = _terminals(module, file, names)
    pools = _pools(module, file, args.pool)
    try:
        flow = Flow(
            *terminals,
            max_workers=args.max_workers,
            fail_fast=not args.no_fail_fast,
            journal_path=args.journal,
            executor=_dask_executor(args.dask, terminals) if args.dask else None,
            pools=pools,
        )
    except UnknownPoolError as error:
        raise _BadInput(
            f"task {error.task!r} uses pool {error.pool!r}, which {file} does not define; "
            f"add POOLS = {{{error.pool!r}: <size>}} to {file} or pass --pool {error.pool}=SIZE"
        ) from error
    except InvalidJournalError as error:  # its path is not a file (checked again at the start)
        raise _BadInput(f"--journal {error}") from error
    _check_pool_options(args.pool, flow, getattr(module, "POOLS", None) or {})
    started = time.monotonic()
    interrupted = False
    try:
        flow.run(
            backend=args.backend, progress=not args.quiet, timeout_s=args.timeout, fresh=args.fresh
        )
    except InvalidJournalError as error:  # refused at the start, before any task runs
        raise _BadInput(f"--journal {error}") from error
    except FlowTimeoutError as error:  # recorded as CANCELLED: the summary shows them
        print(
            f"flowing: --timeout {args.timeout:g}: cancelled {len(error.unfinished)} "
            f"unfinished task(s)",
            file=sys.stderr,
        )
    except KeyboardInterrupt:
        interrupted = True
    results = flow.results
    with _stdout_may_close():
        if args.json:
            print(json.dumps(_as_json(results, time.monotonic() - started), indent=2))
        elif not args.quiet:
            _print_summary(results, time.monotonic() - started)
    written = True
    if args.timeline is not None and results:
        written = _write_timeline(flow, args.timeline, args.quiet)
    if interrupted:
        raise KeyboardInterrupt
    if not _all_ok(results):
        return EXIT_FAILED
    return EXIT_OK if written else EXIT_BAD_INPUT


def _write_timeline(flow: Flow, path: Path, quiet: bool) -> bool:
    """Write the run's chart; a path that cannot be written is one line, not a traceback."""
    try:
        flow.timeline(path)
    except OSError as error:
        print(
            f"flowing: error: cannot write the timeline to {str(path)!r}: "
            f"{error.strerror or describe_error(error)}",
            file=sys.stderr,
        )
        return False
    if not quiet:
        print(f"timeline written to {path}", file=sys.stderr)
    return True


def _check_pool_options(sizes: list[tuple[str, int]], flow: Flow, declared: Any) -> None:
    """A ``--pool`` name that neither POOLS nor any task names is a typo, not a no-op."""
    used = {t.pool for t in flow.tasks if t.pool is not None}
    for name, _ in sizes:
        if name not in used and name not in declared:
            known = ", ".join(sorted(used)) or "none"
            raise _BadInput(f"--pool {name}: no task uses a pool of that name (used: {known})")


def _pools(module: ModuleType, file: str, sizes: list[tuple[str, int]]) -> dict[str, Pool]:
    """The file's ``POOLS``, with each ``--pool NAME=SIZE`` setting that pool's size."""
    try:
        pools = check_pools(getattr(module, "POOLS", None))
    except InvalidPoolError as error:
        raise _BadInput(f"POOLS in {file}: {error}") from error
    for name, size in sizes:
        pools[name] = Pool(size, pools[name].rate) if name in pools else Pool(size)
    return pools


def _check_run_options(args: argparse.Namespace) -> None:
    """Refuse unusable options before anything runs."""
    if args.fresh and args.journal is None:
        raise _BadInput("--fresh empties the journal: give it with --journal PATH")
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        raise _BadInput("--backend trio needs the trio package: pip install trio")
    if args.timeline is not None:
        suffix = args.timeline.suffix.lower()
        if suffix not in IMAGE_SUFFIXES + TEXT_SUFFIXES:
            raise _BadInput(
                f"--timeline {str(args.timeline)!r} must end in one of "
                f"{', '.join(IMAGE_SUFFIXES + TEXT_SUFFIXES)}"
            )
        if suffix in IMAGE_SUFFIXES and importlib.util.find_spec("matplotlib") is None:
            raise MissingExtraError(f"--timeline {str(args.timeline)!r}", "matplotlib", "plot")
        _check_writable(args.timeline, "--timeline")
    if args.dask is not None:
        if importlib.util.find_spec("distributed") is None:
            raise MissingExtraError("--dask", "distributed", "dask")
        if args.backend != "asyncio":
            raise _BadInput("--dask needs --backend asyncio: Dask's asynchronous client runs on asyncio")


def _dask_executor(address: str, terminals: list[TaskDef[..., Any]]) -> Any:
    """A DaskExecutor; the file's own functions travel by value, as workers cannot import it."""
    from .dask import DaskExecutor, send_by_value

    send_by_value({t.fn.__module__ for t in terminals})
    return DaskExecutor(address)


def _check_writable(path: Path, option: str) -> None:
    """Refuse, before the run, a file path the run could not write."""
    if path.is_dir():
        raise _BadInput(f"{option} {str(path)!r} is a directory; give a file path")
    if not path.absolute().parent.is_dir():
        raise _BadInput(f"{option} {str(path)!r}: the directory {str(path.parent)!r} does not exist")
    if not os.access(path if path.exists() else path.absolute().parent, os.W_OK):
        raise _BadInput(f"{option} {str(path)!r}: permission denied; give a path you can write")


def _graph(args: argparse.Namespace) -> int:
    """Draw the graph alone: no Flow, so the pools the tasks name need not be defined."""
    file, names = _split_target(args.target)
    graph = build_graph(_terminals(_import_file(file), file, names))
    with _stdout_may_close():
        print(to_mermaid(graph, {}) if args.format == "mermaid" else to_dot(graph, {}), end="")
    return EXIT_OK


@contextlib.contextmanager
def _stdout_may_close() -> Iterator[None]:
    """Print, and flush; a reader that has gone (``| head``) ends the output quietly.

    stdout then points at the null device, so the interpreter's own flush at exit
    has nothing to complain about; the exit status stays the command's own.
    """
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def _terminals(module: ModuleType, file: str, names: list[str]) -> list[TaskDef[..., Any]]:
    """The tasks ``names``, or every task of the file nothing depends on."""
    tasks = _module_tasks(module)
    if not tasks:
        raise _BadInput(f"{file} defines no task; decorate its functions with @task")
    if not names:
        build_graph(tasks)  # a cycle among the file's tasks has no terminal: report it by name
        needed = {id(dep) for t in tasks for dep in t.depends_on}
        return [t for t in tasks if id(t) not in needed]
    by_name = {t.name: t for t in tasks}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise _BadInput(
            f"{file} has no task named {unknown[0]!r}; its tasks are: {', '.join(sorted(by_name))}"
        )
    return [by_name[name] for name in names]


def _split_target(target: str) -> tuple[str, list[str]]:
    file, colon, names = target.rpartition(":")
    if not colon or not file.endswith(".py"):
        return target, []
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    if not chosen:
        raise _BadInput(f"no task name after ':' in {target!r}")
    return file, chosen


def _import_file(file: str) -> ModuleType:
    path = Path(file)
    if not path.is_file():
        raise _BadInput(_not_a_file(file, path))
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else "__flowing_main__"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise _BadInput(f"cannot import {file!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.absolute().parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise _BadInput(
            f"cannot import {file}: SyntaxError: {error.msg} (line {error.lineno})"
        ) from error
    except (Exception, SystemExit) as error:
        line = _line_in(error, path)
        raise _BadInput(f"cannot import {file}{line}: {describe_error(error)}") from error
    return module


def _not_a_file(file: str, path: Path) -> str:
    """Why ``file`` cannot be imported as a flow file: it is missing or no regular file."""
    if path.is_dir():
        return f"{file!r} is a directory; give the Python file that defines the tasks"
    if path.exists():
        return f"{file!r} is not a regular file; give the Python file that defines the tasks"
    return f"no such file: {file!r}"


def _line_in(error: BaseException, path: Path) -> str:
    """`` (line N)`` for the deepest frame of ``error`` inside ``path``."""
    here = path.resolve()
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == here
    ]
    return f" (line {frames[-1].lineno})" if frames else ""


def _module_tasks(module: ModuleType) -> list[TaskDef[..., Any]]:
    unique: dict[int, TaskDef[..., Any]] = {}
    for value in vars(module).values():
        if isinstance(value, TaskDef):
            unique.setdefault(id(value), value)
    return list(unique.values())


def _all_ok(results: dict[str, StepResult]) -> bool:
    return not any(r.state in (StepState.FAILED, StepState.CANCELLED) for r in results.values())


def _as_json(results: dict[str, StepResult], seconds: float) -> dict[str, Any]:
    return {
        "ok": _all_ok(results),
        "duration_s": round(seconds, 3),
        "tasks": {
            name: {
                "state": r.state.value,
                "value": _json_value(r.value),
                "error": describe_error(r.error) if r.error is not None else None,
                "reason": r.reason,
                "duration_ms": round(r.duration_ms, 1),
                "attempts": r.attempts,
                "detached": r.detached,
                "cached": r.cached,
            }
            for name, r in results.items()
        },
    }


def _json_value(value: Any) -> Any:
    """``value`` if JSON holds it, else its ``repr``, else a placeholder naming its type."""
    try:
        json.dumps(value, allow_nan=False)
    except Exception:
        pass
    else:
        return value
    try:
        return repr(value)
    except Exception:  # a broken __repr__, an int too long to convert to str, ...
        return f"<unrepresentable {type(value).__qualname__}>"


def _print_summary(results: dict[str, StepResult], seconds: float) -> None:
    counts = count_states(results.values())
    shown = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    verdict = "FAILED" if counts["failed"] else "CANCELLED" if counts["cancelled"] else "ok"
    print_summary(results.values(), f"{verdict}: {shown} in {seconds:.2f} s", sys.stdout)
