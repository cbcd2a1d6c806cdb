"""A small ETL pipeline: fetch three sources, clean, join, aggregate, report, notify.

Everything is simulated (no network, no files outside the temp directory) and
deterministic: the exchange-rate API fails on its first call and succeeds on the
retry, every time.

    flowing run examples/etl.py            # live progress, then the summary
    flowing graph examples/etl.py          # the graph as Mermaid
    python examples/etl.py                 # the same run from plain Python
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import anyio

from flowing import Flow, task

COUNTRIES = ("DE", "FR", "NL", "SE", "US")
CURRENCIES = {"DE": "EUR", "FR": "EUR", "NL": "EUR", "SE": "SEK", "US": "USD"}
REFUND_ALERT_RATIO = 0.25  # alert when refunds exceed this share of revenue


# --- extract: async fetches with simulated latency ---------------------------------


@task
async def fetch_orders() -> list[dict[str, object]]:
    """Twelve thousand orders from the shop API (simulated: 0.8 s)."""
    await anyio.sleep(0.8)
    rng = random.Random(7)
    return [
        {
            "id": i,
            "customer": rng.randrange(1500),
            "amount": round(rng.uniform(5, 400), 2),
            "refund": rng.random() < 0.04,
        }
        for i in range(12_000)
    ]


@task
async def fetch_customers() -> list[dict[str, object]]:
    """The customer table from the CRM (simulated: 0.5 s)."""
    await anyio.sleep(0.5)
    rng = random.Random(11)
    return [
        {"id": i, "name": f"customer-{i:04d}", "country": rng.choice(COUNTRIES)}
        for i in range(1500)
    ]


_rate_api_calls = 0


@task(retry=2, retry_backoff_base_ms=300)
async def fetch_exchange_rates() -> dict[str, float]:
    """Today's rates; the API times out on the first call and answers the retry."""
    global _rate_api_calls
    _rate_api_calls += 1
    await anyio.sleep(0.3)
    if _rate_api_calls == 1:
        raise ConnectionError("rates API timed out after 0.3 s")
    return {"EUR": 1.0, "SEK": 0.087, "USD": 0.92}


# --- transform: sync CPU steps, run in worker threads ------------------------------


@task(depends_on=[fetch_orders])
def clean_orders(fetch_orders: list[dict[str, object]]) -> list[dict[str, object]]:
    """Drop duplicates by content hash and zero amounts."""
    seen: set[str] = set()
    cleaned = []
    for order in fetch_orders:
        digest = hashlib.sha256(json.dumps(order, sort_keys=True).encode()).hexdigest()
        if digest not in seen and float(str(order["amount"])) > 0:
            seen.add(digest)
            cleaned.append(order)
    return cleaned


@task(depends_on=[fetch_customers])
def clean_customers(fetch_customers: list[dict[str, object]]) -> dict[int, dict[str, object]]:
    """Index customers by id, normalising names."""
    return {int(str(c["id"])): {**c, "name": str(c["name"]).title()} for c in fetch_customers}


@task(depends_on=[clean_orders, clean_customers, fetch_exchange_rates])
def join_orders(
    clean_orders: list[dict[str, object]],
    clean_customers: dict[int, dict[str, object]],
    fetch_exchange_rates: dict[str, float],
) -> list[dict[str, object]]:
    """Each order with its customer's country and the amount in EUR."""
    joined = []
    for order in clean_orders:
        customer = clean_customers[int(str(order["customer"]))]
        country = str(customer["country"])
        rate = fetch_exchange_rates[CURRENCIES[country]]
        joined.append({**order, "country": country, "eur": float(str(order["amount"])) * rate})
    return joined


@task(depends_on=[join_orders])
def revenue_by_country(join_orders: list[dict[str, object]]) -> dict[str, float]:
    totals: defaultdict[str, float] = defaultdict(float)
    for order in join_orders:
        sign = -1 if order["refund"] else 1
        totals[str(order["country"])] += sign * float(str(order["eur"]))
    return {country: round(total, 2) for country, total in sorted(totals.items())}


@task(depends_on=[join_orders])
def top_customers(join_orders: list[dict[str, object]]) -> list[tuple[int, int]]:
    counts = Counter(int(str(order["customer"])) for order in join_orders)
    return counts.most_common(5)


def _refunds_look_high(join_orders: list[dict[str, object]]) -> bool:
    refunds = sum(float(str(o["eur"])) for o in join_orders if o["refund"])
    revenue = sum(float(str(o["eur"])) for o in join_orders)
    return refunds > REFUND_ALERT_RATIO * revenue


@task(depends_on=[join_orders], when=_refunds_look_high)
def page_on_call(join_orders: list[dict[str, object]]) -> str:
    """Only when refunds look abnormal (they do not today: the task is skipped)."""
    return "paged the on-call engineer"


# --- load: the report, then a notification that never blocks it --------------------


@task(depends_on=[revenue_by_country, top_customers])
def write_report(revenue_by_country: dict[str, float], top_customers: list[tuple[int, int]]) -> str:
    """Write the daily report to the temp directory and return its path."""
    path = Path(tempfile.gettempdir()) / "flowing-etl-report.json"
    report = {"revenue_eur": revenue_by_country, "top_customers": top_customers}
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return str(path)


@task(depends_on=[write_report], detached=True)
async def notify_team(write_report: str) -> str:
    """Post to the team channel (simulated); runs after the main graph, never blocks it."""
    await anyio.sleep(0.2)
    return f"posted a link to {write_report}"


if __name__ == "__main__":
    flow = Flow(write_report, page_on_call)
    flow.run(progress=True)
    print(flow.summary())
