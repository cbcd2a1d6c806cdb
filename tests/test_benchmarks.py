"""The benchmark suite runs end to end; a correctness smoke test, never a timing test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_suite_at_tiny_scale_computes_every_sink_and_writes_json_and_a_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--repeat", "1", "--scale", "0.005",
         "--only", "W1,W2,W3,W6", "--no-peers", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {case["workload"] for case in report["cases"]} == {"W1", "W2", "W3", "W6"}
    for case in report["cases"]:
        floor, ours = case["runners"][case["floor"]], case["runners"]["flowing"]
        assert floor["ratio"] == 1.0
        assert ours["ratio"] > 0 and ours["peak_rss_mb"] > 0
    table = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert all(f"| {case['case']}" in table for case in report["cases"])


def test_a_child_reports_its_own_peak_memory_not_that_of_the_process_that_spawned_it() -> None:
    """ru_maxrss of a child counts its parent's peak too: a 200 MB parent made every small
    case report 200 MB."""
    parent = (
        "import subprocess, sys\n"
        "big = bytearray(200 * 1024 * 1024)\n"
        "big[::4096] = b'x' * len(big[::4096])\n"  # touch every page: 200 MB resident
        "code = 'from benchmarks._case import peak_rss_kb; print(peak_rss_kb())'\n"
        "print(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)\n"
    )
    done = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert 0 < int(done.stdout) < 150 * 1024  # an interpreter with benchmarks imported: tens of MB
