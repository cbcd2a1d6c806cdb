"""Child process: warm up, time one runner on one case, print one JSON line.

    python -m benchmarks._case RUNNER WORKLOAD KIND N
"""

from __future__ import annotations

import json
import resource
import sys
import time

from .runners import RUNNERS
from .workloads import build


def main(argv: list[str]) -> int:
    runner, workload, kind, n = argv
    # A small warm-up run first, so lazy imports and first-call costs stay out of the timing.
    RUNNERS[runner](build(workload, 2, kind))()  # type: ignore[arg-type]
    spec = build(workload, int(n), kind)  # type: ignore[arg-type]
    run = RUNNERS[runner](spec)
    started = time.perf_counter()
    value = run()
    wall_s = time.perf_counter() - started
    if value != spec.expected:
        print(f"{runner} computed {value!r} for the sink, expected {spec.expected!r}", file=sys.stderr)
        return 1
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall_s, "peak_rss_kb": peak_rss_kb, "tasks": len(spec.nodes),
                      "ideal_s": spec.ideal_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
