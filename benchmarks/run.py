"""Run the benchmark suite: every case in fresh child processes, runners alternated.

    python -m benchmarks [--quick] [--json FILE] [--repeat N] [--only W1,W4] [--scale X] [--no-peers]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"dask": "dask", "hamilton": "apache-hamilton"}
CHILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class Case:
    """One row group of the table: a workload at one size, and who runs it."""

    workload: str
    kind: str
    n: int
    quick: bool = False

    @property
    def label(self) -> str:
        size = f"{self.n // 1000}k" if self.n >= 1000 else str(self.n)
        return f"{self.workload} {_TITLES[self.workload]} {self.kind} {size}"

    @property
    def sync_only(self) -> bool:
        return self.workload == "W4" or (self.workload in ("W1", "W2") and self.kind == "sync")

    @property
    def floor(self) -> str:
        return "floor-threads" if self.sync_only else "floor-asyncio"

    def runners(self, quick: bool) -> list[str]:
        names = [self.floor, "flowing"]
        if self.workload == "W1" and not quick:
            names.append("flowing-mapped")  # the same fan-out as one mapped task
        if self.n == 10_000 and self.workload != "W4" and not quick:
            names += ["flowing+plain", "flowing+rich"]  # the cost of run(progress=True)
        if self.sync_only:
            names.append("dask")
            # Hamilton's driver is superlinear (seconds at 10k) and recursive along a chain.
            limit = 1000 if quick or self.workload == "W2" else 10_000
            if self.n <= limit and not (quick and self.workload == "W4"):
                names.append("hamilton")  # --quick: its W4 run alone takes over a second
        return names


_TITLES = {"W1": "fan-out", "W2": "chain", "W3": "I/O", "W4": "uneven chains", "W6": "interleaved"}

CASES = [
    Case("W1", "sync", 1000),
    Case("W1", "sync", 10_000, quick=True),
    Case("W1", "sync", 100_000),
    Case("W1", "async", 1000),
    Case("W1", "async", 10_000, quick=True),
    Case("W1", "async", 100_000),
    Case("W2", "sync", 1000, quick=True),
    Case("W2", "sync", 10_000),
    Case("W2", "async", 1000, quick=True),
    Case("W2", "async", 10_000),
    Case("W3", "async", 1000, quick=True),
    Case("W3", "async", 10_000),
    Case("W4", "sync", 10, quick=True),
    Case("W6", "mixed", 1000, quick=True),
    Case("W6", "mixed", 10_000),
]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cases = [c for c in CASES if (c.quick or not args.quick) and _selected(c, args.only)]
    if args.scale != 1:
        cases = [dataclasses.replace(c, n=max(2, round(c.n * args.scale))) for c in cases]
    repeat = args.repeat or (3 if args.quick else 5)
    missing = [peer for peer in PEERS if args.no_peers or importlib.util.find_spec(peer) is None]
    for peer in [] if args.no_peers else missing:
        print(f"note: {peer} is not installed, its rows are skipped (pip install -e '.[bench]')")
    report = {
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeat": repeat,
        "versions": _versions(),
        "cases": [],
    }
    print(f"{report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"Python {report['machine']['python']}, load {report['machine']['load_at_start']}")
    started = time.perf_counter()
    for case in cases:
        runners = [r for r in case.runners(args.quick) if r not in missing]
        samples = _measure(case, runners, repeat)
        row = _summarise(case, runners, samples)
        report["cases"].append(row)
        _print_case(row)
    report["machine"]["load_at_end"] = _load()
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"\n{len(cases)} cases in {report['elapsed_s']} s, load {report['machine']['load_at_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [r for row in report["cases"] for r, s in row["runners"].items() if s.get("error")]
    return 1 if failed else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    parser.add_argument("--repeat", type=int, help="children per runner and case (3 quick, 5 full)")
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1,W4")
    parser.add_argument("--no-peers", action="store_true", help="only the floors and flowing")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N (a smoke test: 0.01)")
    return parser.parse_args(argv)


def _selected(case: Case, only: str | None) -> bool:
    return only is None or case.workload in only.split(",")


def _measure(case: Case, runners: list[str], repeat: int) -> dict[str, list[dict[str, Any]]]:
    """``repeat`` rounds; each round runs every runner once, in a rotated order."""
    samples: dict[str, list[dict[str, Any]]] = {r: [] for r in runners}
    for round_ in range(repeat):
        shift = round_ % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            samples[runner].append(_child(runner, case))
    return samples


def _child(runner: str, case: Case) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks._case", runner, case.workload, case.kind, str(case.n)]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _summarise(case: Case, runners: list[str], samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case.label, "workload": case.workload, "kind": case.kind,
                           "n": case.n, "floor": case.floor, "runners": {}}
    for runner in runners:
        good = [s for s in samples[runner] if "error" not in s]
        if len(good) < len(samples[runner]):
            row["runners"][runner] = {"error": next(s["error"] for s in samples[runner] if "error" in s)}
            continue
        walls = [s["wall_s"] for s in good]
        rss = [s["peak_rss_kb"] / 1024 for s in good]
        tasks = good[0]["tasks"]
        row["runners"][runner] = {
            "wall_s": walls,
            "median_s": statistics.median(walls),
            "min_s": min(walls),
            "max_s": max(walls),
            "us_per_task": statistics.median(walls) / tasks * 1e6,
            "peak_rss_mb": statistics.median(rss),
            "tasks": tasks,
            "ideal_s": good[0].get("ideal_s"),
        }
    floor = row["runners"].get(case.floor, {})
    for stats in row["runners"].values():
        if "median_s" in stats and "median_s" in floor:
            stats["ratio"] = stats["median_s"] / floor["median_s"]
            stats["rss_ratio"] = stats["peak_rss_mb"] / floor["peak_rss_mb"]
        if stats.get("ideal_s"):
            stats["ratio_to_ideal"] = stats["median_s"] / stats["ideal_s"]
    for runner in runners:
        # The median of every pair from every child: the pairs cancel drift, and
        # pooling them narrows the noise of a few percent that a display costs.
        paired = [ratio for s in samples[runner] for ratio in s.get("pair_ratios", ())]
        if paired and "median_s" in row["runners"][runner]:
            quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
            row["runners"][runner]["vs_baseline"] = quartiles[1]
            row["runners"][runner]["vs_baseline_iqr"] = [quartiles[0], quartiles[2]]
            row["runners"][runner]["pairs"] = len(paired)
    return row


def _print_case(row: dict[str, Any]) -> None:
    print(f"\n{row['case']} (ratio to {row['floor']} in this run)")
    print(f"  {'runner':<14}{'ratio':>7}  {'median s':>9}  {'min-max s':>15}  {'us/task':>9}  {'RSS MB':>7}  {'RSS ratio':>9}")
    for runner, s in row["runners"].items():
        if "error" in s:
            print(f"  {runner:<14}failed: {s['error']}")
            continue
        extra = f"  ({s['ratio_to_ideal']:.2f}x ideal)" if "ratio_to_ideal" in s else ""
        if "vs_baseline" in s:
            low, high = s["vs_baseline_iqr"]
            extra += (
                f"  ({s['vs_baseline'] - 1:+.1%} vs flowing, median of {s['pairs']} pairs;"
                f" middle half {low - 1:+.0%} to {high - 1:+.0%})"
            )
        print(
            f"  {runner:<14}{s.get('ratio', float('nan')):>6.2f}x  {s['median_s']:>9.4f}  "
            f"{s['min_s']:>7.4f}-{s['max_s']:<7.4f}  {s['us_per_task']:>9.1f}  "
            f"{s['peak_rss_mb']:>7.1f}  {s.get('rss_ratio', float('nan')):>8.2f}x{extra}"
        )


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_at_start": _load()}


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _versions() -> dict[str, str]:
    versions = {}
    for dist in ("flowing", "anyio", *PEERS.values()):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import main as _main

    raise SystemExit(_main())
