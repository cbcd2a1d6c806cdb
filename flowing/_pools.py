"""Concurrency limits: named pools shared by tasks, with an optional start rate.

Every attempt of a task in a pool waits for a token of the pool, then for its turn
in the pool's start rate; the attempt's ``TaskStarted`` is emitted only after that.
An attempt holds at most one pool token, so tasks cannot deadlock on pools; a sync
body abandoned after a timeout hands its token to its thread (``PoolSlot``). Waiting
is done on anyio primitives (``CapacityLimiter``, ``Lock``, ``sleep_until``): no
polling. Limits belong to one run of one Flow. A task's own ``max_concurrency``
bounds its mapped instances and lives in ``_mapping``. ``import flowing`` needs only
``Pool`` and the checks, so the run-time classes import anyio themselves.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._exceptions import InvalidPoolError, InvalidTaskError, UnknownPoolError

if TYPE_CHECKING:
    import anyio

    from ._task import TaskDef


@dataclass(frozen=True, slots=True)
class Pool:
    """A named limit shared by tasks: at most ``size`` attempts at once (None: no
    bound) and at most ``rate`` attempt starts per second (None: no bound)."""

    size: int | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (
            isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1
        ):
            raise InvalidPoolError(f"Pool size must be None or an int >= 1, got {self.size!r}")
        if self.rate is not None and (
            isinstance(self.rate, bool)
            or not isinstance(self.rate, (int, float))
            or not 0 < self.rate < math.inf
        ):
            raise InvalidPoolError(
                f"Pool rate must be None or a number of starts per second > 0, got {self.rate!r}"
            )


def check_pools(pools: Mapping[str, Pool | int] | None) -> dict[str, Pool]:
    """``Flow(pools=...)``: names to a Pool, or to an int as a shorthand for ``Pool(size)``."""
    if pools is None:
        return {}
    if not isinstance(pools, Mapping):
        raise InvalidPoolError(f"pools must be a dict of name -> Pool or int, got {pools!r}")
    checked = {}
    for name, pool in pools.items():
        if not isinstance(name, str) or not name:
            raise InvalidPoolError(f"pool names must be non-empty strings, got {name!r}")
        if isinstance(pool, Pool):
            checked[name] = pool
        elif isinstance(pool, int) and not isinstance(pool, bool) and pool >= 1:
            checked[name] = Pool(pool)
        else:
            raise InvalidPoolError(
                f"pool {name!r} must be an int >= 1 (its size) or a Pool(size, rate=...), "
                f"got {pool!r}"
            )
    return checked


def check_pool_names(tasks: Iterable[TaskDef[..., Any]], pools: Mapping[str, Pool]) -> None:
    """Every pool a task names must be defined by the Flow."""
    for task in tasks:
        if task.pool is not None and task.pool not in pools:
            raise UnknownPoolError(task.name, task.pool, sorted(pools))


def check_pool(name: str, pool: Any) -> str | None:
    """``@task(pool=...)``: None or a pool name."""
    if pool is not None and (not isinstance(pool, str) or not pool):
        raise InvalidTaskError(
            f"pool of task {name!r} must be None or the name of a pool, got {pool!r}"
        )
    return pool


def check_max_concurrency(name: str, limit: Any, map_over: str | None) -> int | None:
    """``@task(max_concurrency=...)``: None, or an int >= 1 on a mapped task."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidTaskError(
            f"max_concurrency of task {name!r} must be None or an int >= 1, got {limit!r}"
        )
    if map_over is None:
        raise InvalidTaskError(
            f"max_concurrency of task {name!r} bounds its mapped instances, but it has no "
            f"map_over; to limit several tasks together, give them a pool"
        )
    return limit


MAX_BURST = 100_000
"""The largest burst a rate admits: more starts per second than a process makes."""


class StartRate:
    """At most ``burst = min(max(1, int(rate)), MAX_BURST)`` starts in any window of
    ``burst / rate`` s.

    Invariant: ``_starts`` holds the times of the latest ``burst`` starts at most,
    oldest first; a new start waits until the oldest one leaves the window.
    """

    def __init__(self, rate: float) -> None:
        self.burst = min(max(1, int(rate)), MAX_BURST)
        self.window = self.burst / rate
        self._starts: deque[float] = deque(maxlen=self.burst)
        import anyio

        self._lock = anyio.Lock()

    async def wait_turn(self) -> None:
        import anyio

        async with self._lock:
            if len(self._starts) == self.burst:
                await anyio.sleep_until(self._starts[0] + self.window)
            self._starts.append(anyio.current_time())


class _PoolGate:
    def __init__(self, pool: Pool) -> None:
        import anyio

        self.limiter = anyio.CapacityLimiter(pool.size) if pool.size is not None else None
        self.rate = StartRate(pool.rate) if pool.rate is not None else None


class PoolSlot:
    """One attempt's pool token, borrowed on behalf of this object.

    Invariant: exactly one side gives the token back. ``_state`` moves from
    "held" to "released" (the attempt ended and released it), or to "abandoned"
    (the attempt's sync body was abandoned after a timeout or cancellation: its
    thread gives the token back when the function returns, so a pool bounds the
    bodies actually running, like ``max_workers``).
    """

    def __init__(self, limiter: anyio.CapacityLimiter | None) -> None:
        self._limiter = limiter
        self._lock = threading.Lock()
        self._state = "held"  # -> "returned" (the body's thread is done) -> "released"

    async def acquire(self) -> None:
        if self._limiter is not None:
            await self._limiter.acquire_on_behalf_of(self)

    def release(self) -> None:
        """At the end of the attempt, from the event loop."""
        with self._lock:
            mine = self._state in ("held", "returned")
            if mine:
                self._state = "released"
        if mine and self._limiter is not None:
            self._limiter.release_on_behalf_of(self)

    def abandon(self) -> None:
        """The attempt's sync body runs on unwatched: its thread will give the token back."""
        with self._lock:
            if self._state == "held":
                self._state = "abandoned"

    def thread_returned(self) -> None:
        """Called in the body's thread when its function returns."""
        with self._lock:
            abandoned = self._state == "abandoned"
            if abandoned:
                self._state = "released"
            elif self._state == "held":
                self._state = "returned"
        if abandoned and self._limiter is not None:
            import anyio.from_thread  # only abandoned threads need it: keep import light

            try:
                anyio.from_thread.run_sync(self._limiter.release_on_behalf_of, self)
            except Exception:
                pass  # the run and its event loop are gone: nobody needs the token back


class Limits:
    """The concurrency limits of one run; create it inside the run's event loop."""

    def __init__(self, pools: Mapping[str, Pool] | None = None) -> None:
        self._pools = {name: _PoolGate(pool) for name, pool in (pools or {}).items()}

    @asynccontextmanager
    async def hold(self, pool: str) -> AsyncIterator[PoolSlot]:
        """Hold a slot of ``pool`` (a name of this run's pools) for one attempt."""
        gate = self._pools[pool]
        slot = PoolSlot(gate.limiter)
        await slot.acquire()
        try:
            if gate.rate is not None:
                await gate.rate.wait_turn()
            yield slot
        finally:
            slot.release()
