"""Concurrency gauges shared by the tests of limits (pools, mapped instances) and of
how wide fan-outs start."""

from __future__ import annotations

import threading

import anyio


class Tracker:
    """Counts bodies running at once; ``full`` is set when ``limit`` of them are.

    Bodies hold on ``release`` until the test sets it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.full = threading.Event()
        self.release = threading.Event()

    def enter(self) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            if self.active >= self.limit:
                self.full.set()

    def leave(self) -> None:
        with self.lock:
            self.active -= 1


class Rendezvous:
    """Async bodies that each wait until all ``width`` of them have arrived: a run
    that does not have them all waiting at once deadlocks (a test bounds it)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.arrived: list[int] = []
        self._everyone = anyio.Event()

    async def arrive(self, k: int) -> int:
        self.arrived.append(k)
        if len(self.arrived) == self.width:
            self._everyone.set()
        await self._everyone.wait()
        return k
