"""The same pipeline on this machine or on a Dask cluster: one argument differs.

    python examples/laptop_to_cluster.py                  # in-process threads
    python examples/laptop_to_cluster.py --dask           # a local 2-process Dask cluster
    python examples/laptop_to_cluster.py --dask HOST:8786 # an existing cluster
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio

from flowing import Flow, TaskDef, task

CHUNKS = 4
LIMIT = 650_000


@task
async def plan() -> list[range]:
    await anyio.sleep(0.1)  # stands in for an API call: async bodies stay on the local loop
    # The odd numbers in equal, interleaved shares: every chunk gets as much work.
    return [range(3 + 2 * i, LIMIT, 2 * CHUNKS) for i in range(CHUNKS)]


def count_primes(numbers: range) -> int:
    """Pure-Python CPU work: threads share one GIL, processes do not."""
    return sum(1 for n in numbers if n > 1 and all(n % d for d in range(2, int(n**0.5) + 1)))


def chunk(i: int) -> TaskDef[..., Any]:
    @task(name=f"primes_{i}", depends_on=[plan])
    def primes(plan: list[range]) -> int:
        return count_primes(plan[i])

    return primes


chunks = [chunk(i) for i in range(CHUNKS)]


@task(depends_on=chunks, local=True)  # in this process, whatever the executor
def report(**counts: int) -> int:
    return 1 + sum(counts.values())  # 1 for 2, the only even prime


def main(argv: list[str]) -> None:
    executor = None
    cluster = None
    if argv[:1] == ["--dask"]:
        from flowing.dask import DaskExecutor

        if len(argv) > 1:
            executor = DaskExecutor(argv[1])
        else:
            from distributed import LocalCluster

            cluster = LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=":0",
            )
            executor = DaskExecutor(cluster)
    try:
        flow = Flow(report, executor=executor)  # <- the one argument
        start = time.perf_counter()
        flow.run()
        elapsed = time.perf_counter() - start
        where = "in-process threads" if executor is None else repr(executor)
        print(f"{flow.value(report)} primes below {LIMIT:,} in {elapsed:.2f} s on {where}")
    finally:
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main(sys.argv[1:])
