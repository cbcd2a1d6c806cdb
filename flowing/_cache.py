"""Caching a task's result on its code and input values: ``@task(cache=True)``.

The cache key is a SHA-256 of the task's *code key* (its step key from ``_keys`` --
body, gates, dependency names -- with every dependency's key left empty) and each
input's name and *value digest*, so "same code, same inputs" hits across different
graphs and different upstream code. A value digest is a SHA-256 of a stable,
type-tagged encoding that does not depend on the process (no ``hash()``, no ``id()``,
sets and dicts sorted by encoding):

    None, bool, int, float, complex, str, bytes, bytearray, range, Decimal, Fraction,
    UUID, date/time/datetime/timedelta, pure paths, enum members, and tuples, lists,
    dicts, sets, frozensets, named tuples and dataclass instances of these.

Any other value (or a subclass of a listed container, or a cycle) cannot be encoded
stably: the task then runs as if uncached and its result is not stored: never a hit.

Small inputs are hashed on the event loop; once the encoding passes ``INLINE_BUDGET``
units of work it starts over in a worker thread, so large inputs never block the loop.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ._keys import compute_step_key
from ._log import logger
from ._results import StepResult, StepState

if TYPE_CHECKING:
    from ._journal import JournalRun
    from ._task import TaskDef


CACHE_VERSION = 1
"""Bumped whenever the encoding changes; entries of other versions never match."""


INLINE_BUDGET = 2000
"""Encoding work done on the event loop: one unit per value, plus one per 4 KiB of text."""


class Unencodable(Exception):
    """A value has no stable encoding, so its task is not cached."""


class _OverBudget(Exception):
    """The encoding needs more work than may be done on the event loop."""


class _Budget:
    def __init__(self, units: int) -> None:
        self.left = units

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _OverBudget()


def code_key(task: TaskDef[..., Any]) -> str:
    """The part of the cache key that depends on the task's code alone."""
    return compute_step_key(task, {dep.name: "" for dep in task.depends_on})


def cache_key(code: str, kwargs: Mapping[str, Any], budget: _Budget | None = None) -> str:
    """The key of a task with code key ``code`` run on ``kwargs``; raises Unencodable."""
    digest = hashlib.sha256(f"flowing-cache/{CACHE_VERSION}/{code}".encode())
    for name in sorted(kwargs):
        digest.update(f"{len(name)}:{name}=".encode())
        digest.update(value_digest(kwargs[name], budget=budget).encode())
    return digest.hexdigest()


def value_digest(value: Any, active: set[int] | None = None, budget: _Budget | None = None) -> str:
    """A SHA-256 of ``value``'s stable encoding; raises Unencodable for anything else."""
    digest = hashlib.sha256()
    try:
        _Encoder(digest.update, active if active is not None else set(), budget).encode(value)
    except RecursionError:
        raise Unencodable("a value is nested too deeply to encode") from None
    return digest.hexdigest()


@functools.cache
def _scalars() -> dict[type, Callable[[Any], str]]:
    """Encoders of the scalar types, by exact type; built on first use to keep import light."""
    import datetime
    import decimal
    import fractions
    import pathlib
    import uuid

    return {
        type(None): lambda v: "",
        bool: repr,
        int: repr,
        float: lambda v: v.hex(),
        complex: lambda v: f"{v.real.hex()},{v.imag.hex()}",
        str: lambda v: v,
        decimal.Decimal: str,
        fractions.Fraction: str,
        uuid.UUID: str,
        datetime.date: lambda v: v.isoformat(),
        datetime.datetime: lambda v: v.isoformat(),
        datetime.time: lambda v: v.isoformat(),
        datetime.timedelta: lambda v: f"{v.days},{v.seconds},{v.microseconds}",
        range: lambda v: f"{v.start},{v.stop},{v.step}",
        pathlib.PurePosixPath: str,
        pathlib.PureWindowsPath: str,
        pathlib.PosixPath: str,
        pathlib.WindowsPath: str,
    }


class _Encoder:
    """Writes a length-prefixed, type-tagged encoding; ``_active`` guards against cycles."""

    def __init__(
        self, update: Callable[[bytes], None], active: set[int], budget: _Budget | None
    ) -> None:
        self._update = update
        self._active = active  # ids of the containers being encoded, outermost first
        self._budget = budget

    def _write(self, tag: str, data: bytes = b"") -> None:
        if self._budget is not None:
            self._budget.spend(1 + len(data) // 4096)
        self._update(b"%s:%d:" % (tag.encode(), len(data)))
        self._update(data)

    def encode(self, value: Any) -> None:
        kind = type(value)
        scalar = _scalars().get(kind)
        if scalar is not None:
            self._write(kind.__qualname__, scalar(value).encode("utf-8", "surrogatepass"))
        elif kind in (bytes, bytearray):
            self._write(kind.__qualname__, bytes(value))
        elif isinstance(value, enum.Enum):
            self._write(f"enum:{_qualified(kind)}", value.name.encode())
        else:
            if id(value) in self._active:
                raise Unencodable("a value contains itself")
            self._active.add(id(value))
            try:
                self._container(kind, value)
            finally:
                self._active.discard(id(value))

    def _container(self, kind: type, value: Any) -> None:
        if kind in (tuple, list):
            self._items(kind.__qualname__, value)
        elif kind is dict:
            self._unordered("dict", [self._pair(k, v) for k, v in value.items()])
        elif kind in (set, frozenset):
            self._unordered(kind.__qualname__, [self._digest(item) for item in value])
        elif isinstance(value, tuple) and hasattr(kind, "_fields"):
            self._items(f"namedtuple:{_qualified(kind)}", value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = dataclasses.fields(value)
            self._write(f"dataclass:{_qualified(kind)}", str(len(fields)).encode())
            for field in fields:
                self.encode(field.name)
                self.encode(getattr(value, field.name))
        else:
            raise Unencodable(
                f"an input of type {_qualified(kind)} has no stable encoding"
            )

    def _items(self, tag: str, items: Any) -> None:
        self._write(tag, str(len(items)).encode())
        for item in items:
            self.encode(item)

    def _pair(self, key: Any, value: Any) -> str:
        return self._digest(key) + self._digest(value)

    def _digest(self, value: Any) -> str:
        return value_digest(value, self._active, self._budget)

    def _unordered(self, tag: str, digests: list[str]) -> None:
        self._write(tag, ",".join(sorted(digests)).encode())


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


class ResultCache:
    """Where ``cache=True`` results live: ``memory`` (the Flow's, for its life) and,
    when the Flow has one, the journal (across processes)."""

    def __init__(
        self,
        memory: MutableMapping[str, Any],
        journal: JournalRun | None = None,
        tasks: Iterable[TaskDef[..., Any]] = (),
    ) -> None:
        self.memory = memory
        self.journal = journal
        self._told: set[str] = set()  # tasks already warned about a missing key
        # Code keys by task (a mapped task's instances share their task's entry).
        self._code_keys: dict[TaskDef[..., Any], str] = {}
        # The run's cached tasks that share their code key with another: they differ
        # only in what the key leaves out (a captured object), so neither is cached.
        self._clashes = self._clashing([t for t in tasks if t.cache])

    def _clashing(self, tasks: list[TaskDef[..., Any]]) -> dict[TaskDef[..., Any], str]:
        """Each of ``tasks`` whose code key another one shares, with that one's name."""
        first: dict[str, TaskDef[..., Any]] = {}
        clashes: dict[TaskDef[..., Any], str] = {}
        for task in tasks:
            try:
                key = self._code_keys[task] = code_key(task)
            except Exception:  # no fingerprint: it runs uncached, and is told so then
                continue
            other = first.setdefault(key, task)
            if other is not task:
                clashes[task] = other.name
                clashes.setdefault(other, task.name)
        return clashes

    async def run(
        self,
        task: TaskDef[..., Any],
        kwargs: Mapping[str, Any],
        attempts: Callable[[], Awaitable[StepResult]],
    ) -> StepResult:
        """A hit for ``task`` on ``kwargs``, else ``attempts()``, remembered if it succeeded.

        Without a key (an input without a stable encoding, code without a fingerprint)
        the task simply runs, and nothing is stored.
        """
        other = self._clashes.get(getattr(task, "of", task))
        if other is not None:
            self._tell(task, _Clash(other))
            return await attempts()
        try:
            try:
                key = self._key(task, kwargs, _Budget(INLINE_BUDGET))
            except _OverBudget:
                hashing = functools.partial(self._key, task, kwargs, None)
                key = await anyio.to_thread.run_sync(hashing, abandon_on_cancel=True)
        except Exception as error:  # Unencodable, or StepKeyError
            self._tell(task, error)
            return await attempts()
        hit = await self.get(key, task)
        if hit is not None:
            return hit
        result = await attempts()
        if result.succeeded:
            await self.put(key, result)
        return result

    def _key(
        self, task: TaskDef[..., Any], kwargs: Mapping[str, Any], budget: _Budget | None
    ) -> str:
        owner = getattr(task, "of", task)
        code = self._code_keys.get(owner)
        if code is None:
            code = self._code_keys[owner] = code_key(task)
        return cache_key(code, kwargs, budget)

    def _tell(self, task: TaskDef[..., Any], error: Exception) -> None:
        name = getattr(task, "of", task).name  # one warning per mapped task, not per instance
        if name not in self._told:
            self._told.add(name)
            logger.warning("task %r runs uncached: %s", name, error)

    async def get(self, key: str, task: TaskDef[..., Any]) -> StepResult | None:
        """The cached result for ``key``, or None."""
        if key in self.memory:
            return _hit(task, self.memory[key])
        if self.journal is not None:
            replayed = await self.journal.load(key, task.name, task.detached)
            if replayed is not None:
                self.memory[key] = replayed.value
                return _hit(task, replayed.value)
        return None

    async def put(self, key: str, result: StepResult) -> None:
        """Remember a succeeded ``result`` under ``key``."""
        self.memory[key] = result.value
        if self.journal is not None:
            await self.journal.save(key, result)


class _Clash(Exception):
    def __init__(self, other: str) -> None:
        super().__init__(
            f"its code has the same key as task {other!r}'s; if they differ only in "
            f"something the key leaves out, such as a captured object or a global, one "
            f"would be served the other's results, so neither is cached"
        )


def _hit(task: TaskDef[..., Any], value: Any) -> StepResult:
    return StepResult(
        task.name,
        StepState.SUCCEEDED,
        value=value,
        reason="cached on its code and inputs",
        detached=task.detached,
        cached=True,
    )
