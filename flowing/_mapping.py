"""Dynamic fan-out: run a task once per element of a dependency's value.

A mapped task (``@task(depends_on=[src], map_over="src")``) becomes, at run time,
one *instance* per element of ``src``'s value, each a full run of the task (gates,
retries, timeout, events) named ``"task[k]"`` that receives the element as ``src``.
The step's value is the list of the instances' values, in element order.

Instances of a plain sync task (no gates, retries, timeout, cache, pool or
``max_concurrency``) run in batches on at most ``max_workers`` worker threads
(see ``_batches``). Otherwise at most ``window`` instances are in progress at
once: the task's ``max_concurrency``, else (sync bodies) ``4 * max_workers``,
else no bound. Under fail_fast, once an instance fails (or the run stops) no new
instance starts; the unstarted ones are SKIPPED.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._attempt import (
    UNASKED_CANCELLATION,
    StepContext,
    call_result,
    instances_wait_only_for_a_thread,
    is_cancellation,
    run_step,
    step_result,
)
from ._batches import InstanceBatches, InstanceReturned
from ._cache import value_digest
from ._events import ThreadAbandoned, make_instance_finished, make_started
from ._exceptions import MapOverError
from ._results import StepResult, StepState, make_result
from ._runners import BEGIN_AHEAD, Runners, open_runners
from ._task import TaskDef

QUEUED_PER_THREAD = 4
_SLOTS = tuple(getattr(TaskDef, slot) for slot in TaskDef.__slots__ if slot != "__weakref__")


class TaskInstance(TaskDef[..., Any]):
    """One element's run of a mapped task: the task's policies under the name ``task[k]``."""

    __slots__ = ("of", "item")

    of: TaskDef[..., Any]
    item: int

    @classmethod
    def of_element(cls, task: TaskDef[..., Any], k: int, values: list[Any]) -> TaskInstance:
        """Instance ``k`` of ``task``; ``values`` are ``task_slot_values(task)``."""
        instance = object.__new__(cls)
        for slot, value in zip(_SLOTS, values):
            slot.__set__(instance, value)
        instance.name = f"{task.name}[{k}]"
        instance.map_over = None
        instance.of = task
        instance.item = k
        return instance


def task_slot_values(task: TaskDef[..., Any]) -> list[Any]:
    """Every attribute of ``task``, read once per mapped step for its instances."""
    return [slot.__get__(task) for slot in _SLOTS]


def launch_window(task: TaskDef[..., Any], ctx: StepContext) -> int | None:
    """How many instances may be in progress at once; None for no bound."""
    if task.max_concurrency is not None:
        return task.max_concurrency
    if not task.is_async:
        # A few per thread stay queued on the thread limiter, so a thread that frees up
        # takes the next instance at once; one per thread left threads idle between them.
        return QUEUED_PER_THREAD * int(ctx.slots.limiter.total_tokens)
    return None


async def run_mapped(
    task: TaskDef[..., Any],
    index: int,
    kwargs: dict[str, Any],
    ctx: StepContext,
    *,
    fail_fast: bool,
    halted: Callable[[], bool],
) -> StepResult:
    """Run one instance of ``task`` per element of ``kwargs[task.map_over]``."""
    assert task.map_over is not None
    started_at = time.monotonic()
    # The step's own start (one attempt: its instances retry each on their own).
    ctx.emit(make_started(task.name, index, ctx.total, started_at, 1, 1))
    memory = ctx.mappings if ctx.mappings is not None else MappingMemory()
    kept = memory.kept.get(task.name)
    if kept is not None and not kept.has_inputs(kwargs):
        kept = None
    try:
        items = kept.items if kept is not None else _elements(task, kwargs, memory.consumed)
    except Exception as error:
        reason = f"cannot map over {task.map_over!r}"
        return step_result(task, started_at, StepState.FAILED, error=error, reason=reason)
    fan_out = _FanOut(task, index, kwargs, ctx, fail_fast, halted)
    try:
        await fan_out.run(items, kept.succeeded if kept is not None else {})
    finally:  # also when cancelled: what succeeded is kept for resume()
        memory.kept[task.name] = KeptInstances.of(kwargs, items, fan_out.results)
    return fan_out.outcome(started_at)


@dataclasses.dataclass
class MappingMemory:
    """What a Flow keeps of its mapped steps from a run() to its resume()s: each step's
    elements and succeeded instances, and the iterators the steps consumed (an
    iterator yields its elements once), each with the name of the step."""

    kept: dict[str, KeptInstances] = dataclasses.field(default_factory=dict)
    # By id; the iterator itself is held, so that its id is not reused meanwhile.
    consumed: dict[int, tuple[object, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class KeptInstances:
    """A mapped step's inputs, elements and succeeded instances in its latest run, for
    ``resume()``: given the very same input objects, those instances stand, and the
    elements are not listed again (an iterator yields them only once)."""

    inputs: dict[str, Any]
    items: list[Any]
    succeeded: dict[int, StepResult]

    @classmethod
    def of(
        cls, inputs: dict[str, Any], items: list[Any], results: list[StepResult | None]
    ) -> KeptInstances:
        succeeded = {k: r for k, r in enumerate(results) if r is not None and r.succeeded}
        return cls(inputs, items, succeeded)

    def has_inputs(self, kwargs: dict[str, Any]) -> bool:
        """Whether ``kwargs`` are the very objects the step ran on."""
        return kwargs.keys() == self.inputs.keys() and all(
            kwargs[name] is value for name, value in self.inputs.items()
        )


class _FanOut:
    """The instances of one mapped step.

    Invariant: ``results[k]`` is None until instance ``k`` has a final result;
    ``_culprit`` names the first instance that FAILED, None while none did.
    """

    def __init__(
        self,
        task: TaskDef[..., Any],
        index: int,
        kwargs: dict[str, Any],
        ctx: StepContext,
        fail_fast: bool,
        halted: Callable[[], bool],
    ) -> None:
        assert task.map_over is not None
        self.task = task
        self.source = task.map_over
        self.index = index
        self.kwargs = kwargs
        # Its instances' bodies waiting for a thread or a pool check the mapping's own stop too.
        self.ctx = dataclasses.replace(ctx, mapping_stopped=self._stopped_by_failure)
        self.journal = ctx.cache.journal if ctx.cache is not None else None
        self.fail_fast = fail_fast
        self.halted = halted
        self.slot_values = task_slot_values(task)
        self.results: list[StepResult | None] = []
        self._culprit: str | None = None  # the first instance that FAILED
        # Instances run one by one: their elements, their runners, the bound on how
        # many are in progress (None: no bound).
        self._items: list[Any] = []
        self._keys: list[str | None] = []  # the instances' journal keys
        self._runners: Runners | None = None
        self._window: anyio.Semaphore | None = None
        self._interrupt: BaseException | None = None

    async def run(self, items: list[Any], succeeded: dict[int, StepResult]) -> None:
        """Run an instance per element, but for those ``succeeded`` (on ``resume()``),
        which stand: their InstanceFinished is emitted again."""
        self.results = [None] * len(items)
        for k, result in succeeded.items():
            self._finish(k, result)
        pending = [k for k in range(len(items)) if k not in succeeded]
        if self._runs_in_batches():
            await self._run_in_batches([(k, items[k]) for k in pending])
            return
        window = launch_window(self.task, self.ctx)
        self._items = items
        self._keys = await self._journal_keys(items)
        self._window = anyio.Semaphore(window) if window is not None else None
        # The scheduler's own kind of runners: far cheaper per instance than a task group.
        async with open_runners() as runners:
            self._runners = runners
            for started, k in enumerate(pending):
                if self._window is not None:
                    await self._window.acquire()
                elif started % BEGIN_AHEAD == BEGIN_AHEAD - 1:
                    # Let those made begin: quick instances are done with before the
                    # next are made (see Scheduler._next_for_runner).
                    await anyio.lowlevel.checkpoint()
                if self._stopping():
                    if self._window is not None:
                        self._window.release()
                    self._skip_from(k)
                    break
                runners.start_soon(self._instance, k, self._instance_name(k))
        if self._interrupt is not None:
            raise self._interrupt

    def _runs_in_batches(self) -> bool:
        no_journal_nor_executor = self.journal is None and self.ctx.runner is None
        return no_journal_nor_executor and instances_wait_only_for_a_thread(self.task)

    async def _run_in_batches(self, pending: list[tuple[int, Any]]) -> None:
        """Plain sync instances: worker threads run them in batches (see ``_batches``)."""
        batches = InstanceBatches(
            self.task,
            self.kwargs,
            pending,
            self.ctx,
            fail_fast=self.fail_fast,
            stopping=self._stopping,
            on_started=self._batch_started,
            on_returned=self._batch_returned,
            on_abandoned=self._batch_abandoned,
        )
        unstarted = await batches.run()
        if unstarted is not None:
            self._skip_from(unstarted)

    def _batch_started(self, k: int) -> None:
        """Stamped when the loop emits it, like every event: times never go back."""
        name = self._instance_name(k)
        self.ctx.emit(make_started(name, self.index, self.ctx.total, time.monotonic(), 1, 1))

    def _batch_returned(self, report: InstanceReturned) -> None:
        result = call_result(self._instance_name(report.k), report, detached=self.task.detached)
        self._finish(report.k, result)

    def _batch_abandoned(self, k: int) -> None:
        name = self._instance_name(k)
        self.ctx.emit(ThreadAbandoned(name, self.index, self.ctx.total, time.monotonic(), 1))

    def _instance_name(self, k: int) -> str:
        return f"{self.task.name}[{k}]"

    async def _instance(self, k: int) -> None:
        instance = TaskInstance.of_element(self.task, k, self.slot_values)
        kwargs = {**self.kwargs, self.source: self._items[k]}
        key = self._keys[k]
        started_at = time.monotonic()
        try:
            result = await self._replayed(key, instance)
            if result is None:
                result = await run_step(instance, self.index, kwargs, self.ctx)
                if key is not None and self.journal is not None and result.succeeded:
                    with anyio.CancelScope(shield=True):  # journaled before it counts
                        await self.journal.save(key, result)
        except BaseException as exc:
            if not is_cancellation(exc, anyio.get_cancelled_exc_class()):
                self._interrupt = self._interrupt or exc  # KeyboardInterrupt and the like:
                assert self._runners is not None
                self._runners.cancel()  # stop, re-raise once the other instances ended
                return
            if anyio.current_effective_deadline() == -math.inf:
                raise  # the step really is being cancelled
            # The body's own (e.g. asyncio.CancelledError): uncaught, the instance
            # would vanish from the step's value without a trace.
            failed = StepState.FAILED
            result = step_result(instance, started_at, failed, error=exc, reason=UNASKED_CANCELLATION)
        finally:
            if self._window is not None:
                self._window.release()
        self._finish(k, result)
        if self._culprit == result.name:
            await self._stop_on_executor()

    async def _journal_keys(self, items: list[Any]) -> list[str | None]:
        """The instances' journal keys (see ``instance_keys``); all None without a
        journal, or when the step has no key. Hashed in a worker thread: elements may
        be large (a few µs an element, beside a journal write's fraction of a ms)."""
        step_key = self.journal.keys[self.index] if self.journal is not None else None
        if step_key is None:
            return [None] * len(items)
        ordered = isinstance(self.kwargs[self.source], Sequence)
        hashing = functools.partial(instance_keys, step_key, items, ordered)
        return await anyio.to_thread.run_sync(hashing, abandon_on_cancel=True)

    async def _replayed(self, key: str | None, instance: TaskInstance) -> StepResult | None:
        if key is None or self.journal is None:
            return None
        return await self.journal.load(key, instance.name, instance.detached)

    def _stopping(self) -> bool:
        stopped = self._stopped_by_failure() is not None
        return self._interrupt is not None or self.halted() or stopped

    def _stopped_by_failure(self) -> str | None:
        """Why no more instances may start, once one FAILED under fail_fast; else None."""
        if self.fail_fast and self._culprit is not None:
            return f"fail_fast stopped the mapping after {self._culprit!r} failed"
        return None

    async def _stop_on_executor(self) -> None:
        """The first instance FAILED: under fail_fast, the run's executor holds back the
        instances it has not started (those waiting for a thread check ``held_back``)."""
        reason = self._stopped_by_failure()
        if reason is not None and self.ctx.runner is not None:
            await self.ctx.slots.halt_mapping(self.task.name, reason)

    def _skip_from(self, first: int) -> None:
        why = self._stopped_by_failure() or self.ctx.slots.halt_reason or "the run stopped"
        reason = f"not started: {why}"
        for k in range(first, len(self.results)):
            if self.results[k] is not None:
                continue  # kept from the run before
            name = self._instance_name(k)
            detached = self.task.detached
            self._finish(k, make_result(name, StepState.SKIPPED, reason=reason, detached=detached))

    def _finish(self, k: int, result: StepResult) -> None:
        self.results[k] = result
        if result.state is StepState.FAILED:
            self._culprit = self._culprit or result.name
        self.ctx.emit(
            make_instance_finished(result.name, self.index, self.ctx.total, time.monotonic(), k, result)
        )

    def outcome(self, started_at: float) -> StepResult:
        """The mapped step's result: its instances' values in order, or why not."""
        done = [r for r in self.results if r is not None]
        attempts = max((r.attempts for r in done), default=0)
        failed = [r for r in done if r.state is StepState.FAILED]
        if failed:
            first = failed[0]
            return step_result(
                self.task,
                started_at,
                StepState.FAILED,
                error=first.error,
                attempts=attempts,
                reason=f"{len(failed)} of {len(self.results)} instance(s) failed, first "
                f"{first.name!r}" + (f": {first.reason}" if first.reason else ""),
            )
        skipped = [r for r in done if r.state is not StepState.SUCCEEDED]
        if skipped:
            return step_result(
                self.task,
                started_at,
                StepState.SKIPPED,
                attempts=attempts,
                reason=f"{len(skipped)} of {len(self.results)} instance(s) did not succeed, "
                f"first {skipped[0].name!r}: {skipped[0].reason}",
            )
        return step_result(
            self.task,
            started_at,
            StepState.SUCCEEDED,
            value=[r.value for r in done],
            attempts=attempts,
            reason=f"mapped over {len(done)} element(s)",
        )


def instance_keys(step_key: str, items: list[Any], ordered: bool) -> list[str | None]:
    """Each instance's journal key under its step's key ``step_key``.

    An element is keyed by its value digest and by how many equal elements come
    before it, not by its position: the step key covers code, not values, and the
    mapped value may come in another order in another process (a set under another
    hash seed, an upstream that ran again), while a replay must find each element's
    own result. An element without a stable encoding is keyed by its position when
    the mapped value is a sequence (``ordered``), else not journaled.
    """
    seen: Counter[str] = Counter()
    keys: list[str | None] = []
    for k, item in enumerate(items):
        try:
            digest = value_digest(item)
        except Exception:  # Unencodable, as the cache has it, or a dataclass field that raises
            keys.append(_key(f"{step_key}/at/{k}") if ordered else None)
            continue
        keys.append(_key(f"{step_key}/element/{digest}/{seen[digest]}"))
        seen[digest] += 1
    return keys


def _key(text: str) -> str:
    return hashlib.sha256(f"flowing-instance/{text}".encode()).hexdigest()


def _elements(
    task: TaskDef[..., Any], kwargs: dict[str, Any], consumed: dict[int, tuple[object, str]]
) -> list[Any]:
    """The elements ``task`` maps over, listed on the event loop (a generator's own
    code may need its thread: a database cursor, say)."""
    assert task.map_over is not None
    source, value = task.map_over, kwargs[task.map_over]
    if isinstance(value, (str, bytes, bytearray)):
        raise MapOverError(
            task.name,
            source,
            value,
            f"mapping over a {type(value).__name__} would run once per character; "
            f"return a list (e.g. [value]) instead",
        )
    try:
        iterator = iter(value)
    except TypeError:
        raise MapOverError(
            task.name,
            source,
            value,
            f"it is not iterable; return a list (or any iterable) from {source!r}",
        ) from None
    if iterator is value:  # an iterator yields its elements once
        _check_unspent(task, source, value, consumed)
    return list(iterator)


def _check_unspent(
    task: TaskDef[..., Any], source: str, iterator: Any, consumed: dict[int, tuple[object, str]]
) -> None:
    """Refuse an iterator that another mapped step consumed (in this run, or in the run
    a ``resume()`` goes on from), or a generator already iterated otherwise: it would
    map to nothing."""
    earlier = consumed.get(id(iterator))
    if earlier is not None:  # a step maps once a run: this is another step, or a resume()
        why = f"it is an iterator that {earlier[1]!r} already consumed"
    elif inspect.isgenerator(iterator) and inspect.getgeneratorstate(iterator) != "GEN_CREATED":
        why = "it is a generator that was already iterated"
    else:
        consumed[id(iterator)] = (iterator, task.name)
        return
    raise MapOverError(
        task.name, source, iterator, f"{why}; return a list from {source!r} to map over it again"
    )
