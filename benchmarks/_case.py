"""Child process: warm up, time one runner on one case, print one JSON line.

    python -m benchmarks._case RUNNER WORKLOAD KIND N

A runner in ``PAIRED`` (flowing with a progress display) costs a few percent,
less than the run-to-run noise of separate processes on a shared machine: it is
timed ``PAIR_ROUNDS`` times beside its baseline in the same process, each in
turn first, and the line also gives the baseline's median, ``baseline_s``, and
each pair's ratio, ``pair_ratios``.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from .runners import RUNNERS
from .workloads import build

PAIRED = {"flowing+plain": "flowing", "flowing+rich": "flowing"}
PAIR_ROUNDS = 20


def main(argv: list[str]) -> int:
    runner, workload, kind, n = argv
    # A small warm-up run first, so lazy imports and first-call costs stay out of the timing.
    RUNNERS[runner](build(workload, 2, kind))()  # type: ignore[arg-type]
    spec = build(workload, int(n), kind)  # type: ignore[arg-type]
    run = RUNNERS[runner](spec)
    result: dict[str, Any] = {}
    if runner in PAIRED:
        baseline = RUNNERS[PAIRED[runner]](spec)
        walls, baseline_walls = [], []
        for round_ in range(PAIR_ROUNDS):  # in turn first and second: no order bias
            if round_ % 2:
                wall_s, value = _timed(run)
                baseline_walls.append(_timed(baseline)[0])
            else:
                baseline_walls.append(_timed(baseline)[0])
                wall_s, value = _timed(run)
            walls.append(wall_s)
        wall_s = statistics.median(walls)
        result["baseline_s"] = statistics.median(baseline_walls)
        result["pair_ratios"] = [w / b for w, b in zip(walls, baseline_walls)]
    else:
        wall_s, value = _timed(run)
    if value != spec.expected:
        print(f"{runner} computed {value!r} for the sink, expected {spec.expected!r}", file=sys.stderr)
        return 1
    result.update(wall_s=wall_s, peak_rss_kb=peak_rss_kb(), tasks=len(spec.nodes), ideal_s=spec.ideal_s)
    print(json.dumps(result))
    return 0


def peak_rss_kb() -> int:
    """This process's peak resident memory, in KiB.

    On Linux it is the kernel's VmHWM of this process's memory: ``ru_maxrss`` of a
    child process also counts the peak of the parent it was spawned from (the kernel
    carries it across exec), so a child smaller than its parent reported the parent's.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _timed(run: Callable[[], Any]) -> tuple[float, Any]:
    """Time one run, after collecting the garbage of the one before (outside the timing):
    each timed run starts from the same collector state."""
    gc.collect()
    started = time.perf_counter()
    value = run()
    return time.perf_counter() - started, value


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
