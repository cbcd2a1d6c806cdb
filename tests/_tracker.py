"""A concurrency gauge shared by the tests of limits (pools, mapped instances)."""

from __future__ import annotations

import threading


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
