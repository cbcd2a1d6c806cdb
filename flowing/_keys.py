"""Step keys: a content address for a task's result, chained through its dependencies.

A key is a SHA-256 over a version tag, the interpreter's bytecode tag, the task's
own code (its body and its ``when``/``validate``/``retry_until`` gates: bytecode,
constants, names, argument layout, default values, recursively for nested code),
its ``map_over`` dependency if any, and the name and key of each dependency,
sorted by name. Functions the code closes over, wraps, or names as a global of
its own module are fed in the same way, recursively; closed-over values and
globals it names are in the key when they are plain constants (None, bool, int,
float, complex, str, bytes, and tuples and frozensets of these). Cosmetic knobs
(retry and its policies, backoff, timeout_s, detached, pool, max_concurrency,
local, name) and the function's own name, file and line numbers are left out.
Any other captured object or global (a list, a DataFrame, a module, a function
imported from another module) is not in the key: a task that reads such an input
from outside its arguments must receive it from a dependency to have it keyed.
"""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from ._exceptions import StepKeyError
from ._task import TaskDef

KEY_VERSION = 1
"""Bumped whenever the recipe changes; records of other versions never match."""

_GATES = ("when", "validate", "retry_until")


def compute_step_key(task: TaskDef[..., Any], dependency_keys: Mapping[str, str]) -> str:
    """The content-addressed key of ``task``, given the key of each of its dependencies.

    ``dependency_keys`` maps each dependency's name to its own step key. Raises
    :class:`StepKeyError` when the task's code cannot be fingerprinted.
    """
    if not isinstance(task, TaskDef):
        raise TypeError(f"compute_step_key needs a task, got {task!r}")
    expected = {dep.name for dep in task.depends_on}
    if set(dependency_keys) != expected:
        raise ValueError(
            f"dependency_keys of task {task.name!r} must name exactly its dependencies "
            f"{sorted(expected)}, got {sorted(dependency_keys)}"
        )
    for name, key in dependency_keys.items():
        if not isinstance(key, str):
            raise ValueError(
                f"dependency_keys of task {task.name!r} must map each dependency to its "
                f"step key (a str), got {key!r} for {name!r}; a dependency "
                f"without a key (None in flow.step_keys()) leaves its dependents without one too"
            )
    digest = hashlib.sha256()
    feed = _Feeder(digest, task.name)
    feed.text(f"flowing-step-key/{KEY_VERSION}/{sys.implementation.cache_tag}")
    feed.callable("body", task.fn)
    for role in _GATES:
        gate = getattr(task, role)
        feed.text(role)
        if gate is not None:
            feed.callable(role, gate)
    feed.text(f"map_over:{getattr(task, 'map_over', None)}")
    for name in sorted(dependency_keys):
        feed.text(f"dep:{name}={dependency_keys[name]}")
    return digest.hexdigest()


class _Feeder:
    """Feeds an unambiguous, process-independent encoding of code into a hash."""

    def __init__(self, digest: Any, task: str) -> None:
        self._update: Callable[[bytes], None] = digest.update
        self._task = task
        self._seen: set[int] = set()  # ids of functions fed so far: recursion guard only

    def text(self, text: str) -> None:
        self.bytes(text.encode("utf-8", "surrogatepass"))

    def bytes(self, data: bytes) -> None:
        self._update(b"%d:" % len(data))
        self._update(data)

    def callable(self, role: str, fn: Any) -> None:
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
        if isinstance(fn, types.FunctionType):
            if id(fn) in self._seen:
                self.text("function:again")
                return
            self._seen.add(id(fn))
            self.text("function")
            self.code(fn.__code__)
            self.constant(fn.__defaults__, f"a default of the {role}")
            self.constant(
                tuple(sorted((fn.__kwdefaults__ or {}).items())), f"a default of the {role}"
            )
            self._closure(role, fn)
            self._globals(role, fn)
            wrapped = getattr(fn, "__wrapped__", None)
            if wrapped is not None:
                self.callable(role, wrapped)  # a decorator's inner function
            return
        if isinstance(fn, (types.BuiltinFunctionType, type)) and fn.__module__ == "builtins":
            self.text(f"builtin:{fn.__qualname__}")
            return
        raise StepKeyError(
            self._task,
            f"its {role} {fn!r} is not a plain function, so its code cannot be read; "
            f"wrap it in a def or lambda to have the task cached",
        )

    def _closure(self, role: str, fn: types.FunctionType) -> None:
        """Closed-over plain constants and functions; any other captured object is opaque."""
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            self.text(f"cell:{name}")
            try:
                value = cell.cell_contents
            except ValueError:
                self.text("empty")
                continue
            if isinstance(value, (types.FunctionType, types.MethodType)):
                self.callable(role, value)
            elif _is_plain(value):
                self.constant(value, "a closed-over value")
            else:
                self.text("opaque")

    def _globals(self, role: str, fn: types.FunctionType) -> None:
        """Globals the code names that are plain constants or functions of its own module."""
        namespace = fn.__globals__
        for name in sorted(_names(fn.__code__)):
            if name not in namespace:
                continue
            value = namespace[name]
            if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
                self.text(f"global:{name}")
                self.callable(role, value)
            elif _is_plain(value):
                self.text(f"global:{name}")
                self.constant(value, f"global {name!r}")

    def code(self, code: types.CodeType) -> None:
        self.text("code")
        self.bytes(code.co_code)
        self.bytes(getattr(code, "co_exceptiontable", b""))
        self.text(
            f"{code.co_argcount},{code.co_posonlyargcount},{code.co_kwonlyargcount},{code.co_flags}"
        )
        for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
            self.text("\0".join(names))
        self.text("consts")
        for constant in _without_qualnames(code.co_consts):
            self.constant(constant, "a constant")

    def constant(self, value: Any, what: str) -> None:
        """Constants and defaults: the types Python compiles into code, plus None."""
        if value is None or value is Ellipsis or isinstance(value, (bool, int, str)):
            self.text(f"{type(value).__name__}:{value!r}")
        elif isinstance(value, float):
            self.text(f"float:{value.hex()}")
        elif isinstance(value, complex):
            self.text(f"complex:{value.real.hex()},{value.imag.hex()}")
        elif isinstance(value, bytes):
            self.text("bytes")
            self.bytes(value)
        elif isinstance(value, types.CodeType):
            self.code(value)
        elif isinstance(value, tuple):
            self.text(f"tuple:{len(value)}")
            for item in value:
                self.constant(item, what)
        elif isinstance(value, frozenset):
            self._unordered(value, what)
        else:
            raise StepKeyError(
                self._task,
                f"{what} is {type(value).__name__} {value!r:.60}, which has no stable "
                f"fingerprint; pass it from a dependency instead",
            )

    def _unordered(self, items: frozenset[Any], what: str) -> None:
        """A frozenset, independent of hash randomisation: its members' hashes, sorted."""
        parts = []
        for item in items:
            inner = hashlib.sha256()
            _Feeder(inner, self._task).constant(item, what)
            parts.append(inner.hexdigest())
        self.text("frozenset:" + ",".join(sorted(parts)))


def _without_qualnames(constants: tuple[Any, ...]) -> list[Any]:
    """``constants`` minus the qualified names Python < 3.11 stores after nested code.

    Before 3.11, creating a nested function or comprehension loads its qualified
    name (``outer.<locals>.inner``) as a constant, which would put the enclosing
    function's name into the key; 3.11 keeps it on the code object instead.
    """
    if sys.version_info >= (3, 11):
        return list(constants)
    kept: list[Any] = []
    for constant in constants:
        previous = kept[-1] if kept else None
        is_qualname = (
            isinstance(constant, str)
            and isinstance(previous, types.CodeType)
            and constant.rpartition(".")[2] == previous.co_name
        )
        if not is_qualname:
            kept.append(constant)
    return kept


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name used by ``code`` and the code nested in it."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names(constant)
    return names


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(_is_plain(item) for item in value)
    return False
