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
