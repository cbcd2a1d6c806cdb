"""Running a sync body in a worker thread under the run's ``max_workers`` limiter.

anyio's ``to_thread.run_sync(limiter=...)`` gives the token back as soon as the
awaiting task is cancelled, even though an abandoned thread cannot be stopped and
keeps running. To keep ``max_workers`` a true bound, the token is borrowed here on
behalf of the call, and a call that was abandoned gives it back from its own
thread when the function finally returns.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread


class ThreadSlots:
    """The thread budget of one run: ``max_workers`` tokens for sync bodies."""

    def __init__(self, max_workers: int) -> None:
        self.limiter = anyio.CapacityLimiter(max_workers)
        # Threads are bounded by `limiter`; this one only keeps anyio's global
        # default limiter (40 threads) out of the way.
        self._unbounded = anyio.CapacityLimiter(math.inf)

    async def run(self, fn: Callable[[], Any], on_abandon: Callable[[], None]) -> Any:
        """Return ``fn()``, called in a worker thread.

        When cancelled, the thread is abandoned: ``on_abandon`` is called, the
        thread keeps its token until the function returns, and the cancellation
        propagates.
        """
        call = _BorrowedCall(self.limiter, fn)
        await self.limiter.acquire_on_behalf_of(call)
        abandoned = False
        try:
            return await anyio.to_thread.run_sync(
                call.run, abandon_on_cancel=True, limiter=self._unbounded
            )
        except BaseException:
            abandoned = call.abandon()
            if abandoned:
                on_abandon()
            raise
        finally:
            if not abandoned:
                self.limiter.release_on_behalf_of(call)


class _BorrowedCall:
    """One sync call holding a limiter token; decides who gives the token back.

    Invariant: exactly one side releases the token. ``_state`` moves from
    "running" to either "returned" (the event loop releases) or "abandoned"
    (the worker thread releases when the function returns).
    """

    def __init__(self, limiter: anyio.CapacityLimiter, fn: Callable[[], Any]) -> None:
        self._limiter = limiter
        self._fn = fn
        self._lock = threading.Lock()
        self._state = "running"

    def run(self) -> Any:
        try:
            return self._fn()
        finally:
            with self._lock:
                abandoned = self._state == "abandoned"
                self._state = "returned"
            if abandoned:
                self._release_from_thread()

    def abandon(self) -> bool:
        """Called on cancellation; True when the thread is still running and now owns the release."""
        with self._lock:
            if self._state == "returned":
                return False
            self._state = "abandoned"
            return True

    def _release_from_thread(self) -> None:
        try:
            anyio.from_thread.run_sync(self._limiter.release_on_behalf_of, self)
        except Exception:
            pass  # the run and its event loop are gone: nobody needs the token back
