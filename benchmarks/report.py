"""The README's table from a ``--json`` file: ``python -m benchmarks.report bench.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PEERS = ("dask", "hamilton")


def markdown(report: dict[str, Any]) -> str:
    """Ratios first (to the floor of the same run), then µs per task and peak RSS."""
    machine = report["machine"]
    lines = [
        f"{report['date'][:10]}, {machine['cpu']}, {machine['cores']} cores, Python "
        f"{machine['python']}, load average {machine['load_at_start']} at the start and "
        f"{machine.get('load_at_end', '?')} at the end; "
        + ", ".join(f"{name} {version}" for name, version in report["versions"].items())
        + f"; medians of {report['repeat']} child processes per runner and case.",
        "",
        "| case | floor | flowing ÷ floor | dask ÷ floor | Hamilton ÷ floor "
        "| flowing µs/task | floor µs/task | flowing RSS ÷ floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        runners = case["runners"]
        floor, ours = runners.get(case["floor"], {}), runners.get("flowing", {})
        lines.append(
            "| "
            + " | ".join(
                [
                    case["case"] + _ideal(ours),
                    "(a) threads" if case["floor"] == "floor-threads" else "(b) asyncio",
                    _ratio(ours, "ratio", bold=True),
                    *(_ratio(runners.get(peer, {}), "ratio") for peer in PEERS),
                    _number(ours, "us_per_task"),
                    _number(floor, "us_per_task"),
                    _ratio(ours, "rss_ratio"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _ratio(stats: dict[str, Any], key: str, bold: bool = False) -> str:
    if "error" in stats:
        return "failed"
    if key not in stats:
        return "–"
    text = f"{stats[key]:.2f}×"
    return f"**{text}**" if bold else text


def _number(stats: dict[str, Any], key: str) -> str:
    return f"{stats[key]:.1f}" if key in stats else "–"


def _ideal(stats: dict[str, Any]) -> str:
    return f" ({stats['ratio_to_ideal']:.2f}× ideal)" if "ratio_to_ideal" in stats else ""


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
