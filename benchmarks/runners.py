"""One function per engine: ``prepare(spec)`` builds the graph and returns ``run()``.

``run()`` executes the graph once and returns the sink's value; only ``run()``
is timed. Peers are imported inside their function, so a child process loads
only the engine it measures.
"""

from __future__ import annotations

import asyncio
import functools
import graphlib
import io
import os
import queue
import sys
import types
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .workloads import Node, Spec, body

Run = Callable[[], Any]
MAX_WORKERS = 5


def floor_threads(spec: Spec) -> Run:
    """Floor (a): graphlib + a 5-thread pool, each node submitted once its deps are done."""
    fns = {node.name: body(node) for node in spec.nodes}
    graph = {node.name: node.deps for node in spec.nodes}

    def run() -> Any:
        sorter = graphlib.TopologicalSorter(graph)
        sorter.prepare()
        values: dict[str, Any] = {}
        finished: queue.SimpleQueue[tuple[str, Future[Any]]] = queue.SimpleQueue()
        with ThreadPoolExecutor(max_workers=MAX_WORKERS) as pool:

            def submit(name: str) -> None:
                future = pool.submit(fns[name], **{d: values[d] for d in graph[name]})
                future.add_done_callback(lambda f: finished.put((name, f)))

            for name in sorter.get_ready():
                submit(name)
            while sorter.is_active():
                name, future = finished.get()
                values[name] = future.result()
                sorter.done(name)
                for ready in sorter.get_ready():
                    submit(ready)
        return values[spec.sink]

    return run


def floor_asyncio(spec: Spec) -> Run:
    """Floor (b): one asyncio task per node awaiting its deps' tasks; sync bodies in a 5-thread pool."""
    fns = {node.name: body(node) for node in spec.nodes}

    async def one(node: Node, deps: list[asyncio.Task[Any]], pool: ThreadPoolExecutor) -> Any:
        kwargs = {name: await dep for name, dep in zip(node.deps, deps)}
        if node.kind == "async":
            return await fns[node.name](**kwargs)
        call = functools.partial(fns[node.name], **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def main() -> Any:
        with ThreadPoolExecutor(max_workers=MAX_WORKERS) as pool:
            tasks: dict[str, asyncio.Task[Any]] = {}
            for node in spec.nodes:
                deps = [tasks[d] for d in node.deps]
                tasks[node.name] = asyncio.create_task(one(node, deps, pool))
            await asyncio.gather(*tasks.values())
            return tasks[spec.sink].result()

    return lambda: asyncio.run(main())


def flowing(spec: Spec, progress: bool = False) -> Run:
    """flowing itself: ``Flow(sink, max_workers=5).run()`` on the asyncio backend."""
    from flowing import Flow, task

    made: dict[str, Any] = {}
    for node in spec.nodes:
        deps = [made[d] for d in node.deps]
        made[node.name] = task(body(node), name=node.name, depends_on=deps)
    flow = Flow(made[spec.sink], max_workers=MAX_WORKERS)

    def run() -> Any:
        return flow.run(progress=progress)[spec.sink].value

    return run


def flowing_plain(spec: Spec) -> Run:
    """flowing with ``run(progress=True)``, stderr a pipe: one plain line per event."""
    return flowing(spec, progress=True)


def flowing_rich(spec: Spec) -> Run:
    """flowing with ``run(progress=True)`` on a terminal: the rich live display.

    The terminal is a stand-in that says it is one and discards what it is sent, so
    the row counts flowing's own cost, not a terminal emulator's.
    """
    run_flow = flowing(spec, progress=True)

    def run() -> Any:
        saved = sys.stderr
        sys.stderr = _Terminal(open(os.devnull, "wb"))
        try:
            return run_flow()
        finally:
            sys.stderr.close()
            sys.stderr = saved

    return run


class _Terminal(io.TextIOWrapper):
    def isatty(self) -> bool:
        return True


def flowing_mapped(spec: Spec) -> Run:
    """flowing with W1's n middle tasks as one task mapped over n elements (``map_over``)."""
    from flowing import Flow, task

    root_node, *middle, sink_node = spec.nodes
    if not middle or any(node.deps != (root_node.name,) for node in middle):
        raise ValueError("flowing-mapped runs the fan-out workload (W1) only")
    n = len(middle)
    root_fn, sink_fn = body(root_node), body(sink_node)
    if root_node.kind == "async":

        async def root() -> list[Any]:
            return [await root_fn()] * n

        async def sink(each: list[Any]) -> Any:
            return await sink_fn(*each)

    else:

        def root() -> list[Any]:
            return [root_fn()] * n

        def sink(each: list[Any]) -> Any:
            return sink_fn(*each)

    made_root = task(root, name="root")
    each = task(body(middle[0]), name="each", depends_on=[made_root], map_over="root")
    flow = Flow(task(sink, name="sink", depends_on=[each]), max_workers=MAX_WORKERS)

    def run() -> Any:
        return flow.run()["sink"].value

    return run


def dask(spec: Spec) -> Run:
    """dask's threaded scheduler on a dict graph, 5 workers."""
    import dask.threaded

    graph = {node.name: (body(node), *node.deps) for node in spec.nodes}
    return lambda: dask.threaded.get(graph, spec.sink, num_workers=MAX_WORKERS)


def hamilton(spec: Spec) -> Run:
    """Apache Hamilton's default (sync) driver over a module generated from the graph."""
    os.environ.setdefault("HAMILTON_TELEMETRY_ENABLED", "false")
    from hamilton import base, driver

    module = types.ModuleType("flowing_bench_graph")
    for node in spec.nodes:
        params = ", ".join(f"{d}: int" for d in node.deps)
        source = f"def {node.name}({params}) -> int:\n    return _body({', '.join(node.deps)})\n"
        namespace: dict[str, Any] = {"_body": body(node)}
        exec(source, namespace)
        fn = namespace[node.name]
        fn.__module__ = module.__name__
        setattr(module, node.name, fn)
    sys.modules[module.__name__] = module
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * len(spec.nodes)))
    built = driver.Builder().with_modules(module).with_adapters(base.DictResult()).build()
    return lambda: built.execute([spec.sink])[spec.sink]


RUNNERS: dict[str, Callable[[Spec], Run]] = {
    "floor-threads": floor_threads,
    "floor-asyncio": floor_asyncio,
    "flowing": flowing,
    "flowing-mapped": flowing_mapped,
    "flowing+plain": flowing_plain,
    "flowing+rich": flowing_rich,
    "dask": dask,
    "hamilton": hamilton,
}
