"""Delivering the one event stream: to the log, ``on_event``, listeners and ``events()``.

Every event goes through :meth:`Broadcaster.emit`, called by the scheduler on the
event loop. Nothing an observer does can break or stall the run: exceptions are
logged, sync observers are called inline, an async ``on_event`` and every
``events()`` iterator read from a bounded buffer that never makes the run wait.
"""

from __future__ import annotations

import inspect
import math
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import anyio
import anyio.lowlevel

from ._events import Event, FlowFinished, log_event
from ._log import logger
from ._task import is_async_callable

OnEvent = Callable[[Event], Any]
"""An ``on_event`` callback: ``def f(event)`` or ``async def f(event)``."""

DEFAULT_BUFFER = 10_000
CATCH_UP_GRACE_S = 1.0
"""How long an async ``on_event`` may catch up after a run that used up its timeout_s."""


class EventStream:
    """The events of one run as an async iterator; it ends after that run's FlowFinished.

    At most ``buffer`` events wait for the consumer. When a slow consumer lets the
    buffer fill up, each new event discards the oldest waiting one and increments
    ``dropped``: the run never waits, memory stays bounded, and the final
    FlowFinished is always delivered. The consumer may iterate it in another
    thread's event loop than the run's: it is woken there.
    """

    def __init__(self, buffer: int = DEFAULT_BUFFER) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"buffer must be an int >= 1, got {buffer!r}")
        self.dropped = 0
        # Invariant: `_finished` is True once FlowFinished is in `_buffer` (or was
        # consumed) or the stream was closed; then nothing more is appended.
        self.buffer = min(buffer, sys.maxsize)  # a larger one is no bound either
        self._buffer: deque[Event] = deque(maxlen=self.buffer)
        self._finished = False
        # The consumer's wait, its thread, and how to wake it from another thread.
        self._wakeup: anyio.Event | None = None
        self._consumer_loop: object = None  # its anyio token
        self._consumer_thread: int | None = None
        self._call_soon: Callable[[Callable[[], None]], object] | None = None

    @property
    def finished(self) -> bool:
        """True once the run's last event arrived or the stream was closed."""
        return self._finished

    def push(self, event: Event) -> None:
        """Buffer ``event`` for the consumer, discarding the oldest one when full."""
        if self._finished:
            return
        if len(self._buffer) == self.buffer:
            self.dropped += 1
        self._buffer.append(event)
        if isinstance(event, FlowFinished):
            self._finished = True
        self._wake()

    def close(self) -> None:
        """Stop receiving events; the consumer still gets those already buffered."""
        self._finished = True
        self._wake()

    def _wake(self) -> None:
        """Wake the consumer if it waits, in its own event loop's thread."""
        wakeup = self._wakeup
        if wakeup is None or wakeup.is_set():
            return
        if self._consumer_thread == threading.get_ident():
            wakeup.set()
        elif self._call_soon is not None:
            with suppress(RuntimeError):  # the consumer's loop is gone
                self._call_soon(wakeup.set)

    def __aiter__(self) -> EventStream:
        return self

    def _note_consumer(self) -> None:
        """Where the consumer waits (its thread, and how to wake its loop from another):
        noted again whenever its event loop changed."""
        token = anyio.lowlevel.current_token()
        if token == self._consumer_loop:
            return
        from ._threads import call_soon_threadsafe

        self._consumer_loop = token
        self._consumer_thread = threading.get_ident()
        self._call_soon = call_soon_threadsafe()

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._finished:
                raise StopAsyncIteration
            self._note_consumer()
            wakeup = self._wakeup = anyio.Event()
            # Set first, checked second (push does the reverse): an event pushed from
            # another thread meanwhile is seen here, or its push sees this wait.
            if not (self._buffer or self._finished):
                await wakeup.wait()
        return self._buffer.popleft()

    async def aclose(self) -> None:
        """Stop listening and forget the buffered events."""
        self.close()
        self._buffer.clear()


class Broadcaster:
    """Fans each event out to the log, the ``on_event`` callback, listeners and streams."""

    def __init__(self, on_event: OnEvent | None, buffer: int = DEFAULT_BUFFER) -> None:
        self._buffer = buffer
        self._async_callback = on_event if on_event and is_async_callable(on_event) else None
        # Invariant: `_listeners` are called inline, in order, for every event;
        # each that can raise is wrapped so that an exception is logged instead.
        self._listeners: list[Callable[[Event], None]] = []
        if on_event is not None and self._async_callback is None:
            self._listeners.append(_Guarded(on_event, "on_event callback"))
        # Invariant: `_streams` holds every stream that has not finished yet.
        self._streams: list[EventStream] = []

    def emit(self, event: Event) -> None:
        """Deliver one event to every observer; never raises."""
        log_event(event)
        for listener in self._listeners:
            listener(event)
        for stream in self._streams:
            stream.push(event)
        if isinstance(event, FlowFinished):
            self._streams = [s for s in self._streams if not s.finished]

    def add(self, listener: Callable[[Event], None], what: str, *, guard: bool = True) -> None:
        """Call ``listener`` inline for every event from now on (``guard``: see ``listening``)."""
        self._listeners.append(_Guarded(listener, what) if guard else listener)

    def subscribe(self, buffer: int | None = None) -> EventStream:
        """A new stream that receives every event from now until a run finishes."""
        stream = EventStream(self._buffer if buffer is None else buffer)
        self._streams.append(stream)
        return stream

    @contextmanager
    def listening(
        self, listener: Callable[[Event], None], what: str, *, guard: bool = True
    ) -> Iterator[None]:
        """Call ``listener`` inline for each event emitted inside the block.

        ``guard=False`` spares the exception guard, for listeners that cannot
        raise (such as ``deque.append``): then a call costs no Python frame.
        """
        added = _Guarded(listener, what) if guard else listener
        self._listeners.append(added)
        try:
            yield
        finally:
            self._listeners.remove(added)

    @asynccontextmanager
    async def delivering(self, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Run an async ``on_event`` beside the block; on exit, let it catch up.

        The callback reads its own bounded stream, so the run never waits for it.
        With the run's ``timeout_s``, the catch-up ends by that deadline, or
        ``CATCH_UP_GRACE_S`` after the block if that is later (so that the callback
        of a timed-out run still sees its end). An exception from the block cancels
        the delivery and propagates unchanged.
        """
        callback = self._async_callback
        if callback is None:
            yield
            return
        deadline = anyio.current_time() + timeout_s if timeout_s is not None else math.inf
        stream = self.subscribe()
        caught_up = anyio.Event()
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:

            def stop(exc: BaseException) -> None:
                nonlocal error
                error = error or exc
                tg.cancel_scope.cancel()

            guarded = _Guarded(callback, "async on_event callback")
            tg.start_soon(_deliver, stream, guarded, stop, caught_up)
            try:
                yield
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                stop(exc)
            finally:
                stream.close()
            if not await _caught_up_by(caught_up, deadline):
                tg.cancel_scope.cancel()
                logger.warning(
                    "async on_event callback %r was cancelled: it had not caught up with "
                    "the run by its timeout_s=%g (+%g s)",
                    callback,
                    timeout_s,
                    CATCH_UP_GRACE_S,
                )
        _tell_dropped(callback, stream)
        if error is not None:
            raise error


async def _caught_up_by(caught_up: anyio.Event, deadline: float) -> bool:
    """Wait for ``caught_up`` until ``deadline``, or ``CATCH_UP_GRACE_S`` if that is later."""
    with anyio.move_on_after(max(deadline - anyio.current_time(), CATCH_UP_GRACE_S)):
        await caught_up.wait()
    return caught_up.is_set()


def _tell_dropped(callback: OnEvent, stream: EventStream) -> None:
    if stream.dropped:
        logger.warning(
            "async on_event callback %r fell behind: %d event(s) of the run were "
            "dropped (at most %d wait for it; iterate flow.events(buffer=...) instead "
            "to keep more)",
            callback,
            stream.dropped,
            stream.buffer,
        )


async def _deliver(
    stream: EventStream,
    callback: _Guarded,
    stop: Callable[[BaseException], None],
    caught_up: anyio.Event,
) -> None:
    """Feed ``callback``; a KeyboardInterrupt or SystemExit from it stops the run.

    It must not escape this task: on asyncio that would break the event loop.
    """
    try:
        async for event in stream:
            await callback.acall(event)
    except anyio.get_cancelled_exc_class():
        raise
    except BaseException as exc:
        stop(exc)
    finally:
        caught_up.set()


class _Guarded:
    """A callback whose exceptions are logged: the first with its traceback, then counted."""

    def __init__(self, fn: OnEvent, what: str) -> None:
        self.fn = fn
        self.what = what
        self.failures = 0

    def __call__(self, event: Event) -> None:
        try:
            outcome = self.fn(event)
        except Exception as error:
            self._failed(event, error)
            return
        if outcome is not None and inspect.iscoroutine(outcome):
            outcome.close()
            self._failed(event, TypeError(f"{self.fn!r} returned a coroutine; declare it async def"))

    async def acall(self, event: Event) -> None:
        try:
            await self.fn(event)
        except Exception as error:
            self._failed(event, error)

    def _failed(self, event: Event, error: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            logger.error(
                "%s %r raised on %s; the run goes on (further errors from it are "
                "logged at DEBUG)",
                self.what,
                self.fn,
                type(event).__name__,
                exc_info=error,
            )
        else:
            logger.debug("%s raised again on %s: %r", self.what, type(event).__name__, error)
