"""The ``@task`` decorator and the task definition it produces."""

from __future__ import annotations

import inspect
import itertools
import keyword
import math
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeGuard, TypeVar, overload

from ._exceptions import InvalidTaskError, MissingParameterError
from ._pools import check_max_concurrency, check_pool
from ._retry import check_jitter, check_retry_on

P = ParamSpec("P")
R = TypeVar("R")

Gate = Callable[..., Any]
"""A ``when``/``validate``/``retry_until`` callable, sync or async."""

# Detached tasks by creation order, held weakly so that a long-lived process
# that defines tasks in a loop does not keep them alive.
_detached_registry: weakref.WeakValueDictionary[int, TaskDef[Any, Any]] = (
    weakref.WeakValueDictionary()
)
_creation_counter = itertools.count()


class TaskDef(Generic[P, R]):
    """A function declared as a step of a flow, with its dependencies and policies.

    Calling it calls the plain function, so a task can be unit-tested directly.
    """

    __slots__ = (
        "__weakref__",
        "fn",
        "name",
        "depends_on",
        "retry",
        "retry_backoff_base_ms",
        "retry_max_backoff_ms",
        "timeout_s",
        "detached",
        "local",
        "when",
        "validate",
        "retry_until",
        "retry_on",
        "retry_jitter",
        "pool",
        "max_concurrency",
        "map_over",
        "cache",
        "is_async",
        "__wrapped__",
    )

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        depends_on: Iterable[TaskDef[..., Any]] | TaskDef[..., Any] = (),
        retry: int = 0,
        retry_backoff_base_ms: float = 1000,
        retry_max_backoff_ms: float = 30_000,
        timeout_s: float | None = None,
        detached: bool = False,
        name: str | None = None,
        when: Gate | None = None,
        validate: Gate | None = None,
        retry_until: Gate | None = None,
        retry_on: type[Exception] | tuple[type[Exception], ...] | None = None,
        retry_jitter: float = 0.0,
        pool: str | None = None,
        max_concurrency: int | None = None,
        local: bool = False,
        map_over: str | TaskDef[..., Any] | None = None,
        cache: bool = False,
    ) -> None:
        if isinstance(fn, classmethod):
            raise InvalidTaskError(
                f"@task cannot bind the classmethod {fn.__func__.__name__!r} in its class "
                f"body; decorate the bound method once the class exists instead, e.g. "
                f"task(TheClass.{fn.__func__.__name__})"
            )
        if not callable(fn):
            raise InvalidTaskError(f"@task needs a function, got {fn!r}")
        _check_not_a_task(fn)
        self.fn = fn
        self.name = _check_name(fn, name)
        if inspect.isasyncgenfunction(fn):
            raise InvalidTaskError(
                f"task {self.name!r} is an async generator function, which flowing cannot "
                f"await; collect its items in an async def task and return them, e.g. as a list"
            )
        self.depends_on = _check_dependencies(self.name, depends_on)
        self.retry = _check_retry(self.name, retry)
        self.retry_backoff_base_ms = _check_non_negative(
            self.name, "retry_backoff_base_ms", retry_backoff_base_ms
        )
        self.retry_max_backoff_ms = _check_non_negative(
            self.name, "retry_max_backoff_ms", retry_max_backoff_ms
        )
        self.timeout_s = _check_timeout(self.name, timeout_s)
        self.detached = check_flag(f"detached of task {self.name!r}", detached)
        # A sync body stays in this process whatever the executor.
        self.local = check_flag(f"local of task {self.name!r}", local)
        self.when = _check_gate(self.name, "when", when)
        self.validate = _check_gate(self.name, "validate", validate)
        self.retry_until = _check_gate(self.name, "retry_until", retry_until)
        self.retry_on = check_retry_on(self.name, retry_on)
        self.retry_jitter = check_jitter(self.name, retry_jitter)
        self.pool = check_pool(self.name, pool)
        self.map_over = _check_map_over(self.name, map_over, self.depends_on)
        self.max_concurrency = check_max_concurrency(self.name, max_concurrency, self.map_over)
        self.cache = check_flag(f"cache of task {self.name!r}", cache)
        self.is_async = is_async_callable(fn)
        self.__wrapped__ = fn
        _check_parameters(self.name, fn, self.depends_on)
        _check_gate_calls(self)
        if self.detached:
            _detached_registry[next(_creation_counter)] = self

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name!r}>"

    def backoff_ms(self, failed_attempt: int) -> float:
        """Delay before the attempt after ``failed_attempt`` (1-based): base*2^(k-1), capped."""
        # 2.0 ** 1024 overflows: any cap is reached long before that exponent.
        delay = float(self.retry_backoff_base_ms) * 2.0 ** min(failed_attempt - 1, 1023)
        return float(min(delay, self.retry_max_backoff_ms))


_OPTIONS = frozenset(inspect.signature(TaskDef.__init__).parameters) - {"self", "fn"}


@overload
def task(fn: Callable[P, R], /) -> TaskDef[P, R]: ...


@overload
def task(
    *,
    depends_on: Iterable[TaskDef[..., Any]] | TaskDef[..., Any] = (),
    retry: int = 0,
    retry_backoff_base_ms: float = 1000,
    retry_max_backoff_ms: float = 30_000,
    timeout_s: float | None = None,
    detached: bool = False,
    name: str | None = None,
    when: Gate | None = None,
    validate: Gate | None = None,
    retry_until: Gate | None = None,
    retry_on: type[Exception] | tuple[type[Exception], ...] | None = None,
    retry_jitter: float = 0.0,
    pool: str | None = None,
    max_concurrency: int | None = None,
    local: bool = False,
    map_over: str | TaskDef[..., Any] | None = None,
    cache: bool = False,
) -> Callable[[Callable[P, R]], TaskDef[P, R]]: ...


def task(fn: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Declare a function as a flow step: ``@task`` or ``@task(depends_on=[...], ...)``.

    Each dependency's value reaches the function as a keyword argument named
    after the dependency. See the README for every option.
    """
    if fn is not None:
        _check_options(fn, options)
        return TaskDef(fn, **options)

    def decorate(inner: Callable[P, R]) -> TaskDef[P, R]:
        _check_options(inner, options)
        return TaskDef(inner, **options)

    return decorate


def clear_registry() -> None:
    """Forget every detached task declared so far, so no Flow auto-discovers them."""
    _detached_registry.clear()


def registered_detached_tasks() -> list[TaskDef[..., Any]]:
    """Detached tasks still alive, in the order they were declared."""
    return [t for _, t in sorted(_detached_registry.items())]


def is_async_callable(fn: object) -> bool:
    """True for ``async def`` functions, partials of them and objects with ``async __call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)
    )


async def call_gate(gate: Gate, *args: Any, **kwargs: Any) -> Any:
    """Call a sync or async gate and return its (awaited) result."""
    outcome = gate(*args, **kwargs)
    if inspect.isawaitable(outcome):
        return await outcome
    return outcome


def _check_options(fn: object, options: dict[str, Any]) -> None:
    """Every keyword given to ``@task(...)`` is one of its options; a typo says which."""
    unknown = sorted(options.keys() - _OPTIONS)
    if unknown:
        import difflib

        name = options.get("name") or getattr(fn, "__name__", None) or repr(fn)
        close = difflib.get_close_matches(unknown[0], sorted(_OPTIONS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidTaskError(
            f"@task got an unknown option {unknown[0]!r} for task {name!r}; {hint}"
            f"its options are {', '.join(sorted(_OPTIONS))}"
        )


def _check_not_a_task(fn: object) -> None:
    if isinstance(fn, TaskDef):
        raise InvalidTaskError(
            f"task {fn.name!r} is already a task: declare it once, with every option "
            f"in one @task(...), or decorate its plain function (its .fn) again under "
            f"another name"
        )


def _check_name(fn: Callable[..., Any], name: str | None) -> str:
    if name is None:
        name = getattr(fn, "__name__", None)
        if not isinstance(name, str):
            raise InvalidTaskError(f"{fn!r} has no __name__; pass @task(name=...)")
    if not isinstance(name, str) or not name:
        raise InvalidTaskError(f"task name must be a non-empty string, got {name!r}")
    return name


def _check_dependencies(
    name: str, depends_on: Iterable[TaskDef[..., Any]] | TaskDef[..., Any]
) -> tuple[TaskDef[..., Any], ...]:
    if isinstance(depends_on, TaskDef):
        depends_on = (depends_on,)
    if isinstance(depends_on, (str, bytes)) or not isinstance(depends_on, Iterable):
        raise InvalidTaskError(
            f"depends_on of task {name!r} must be a list of tasks, got {depends_on!r}"
        )
    unique: dict[int, TaskDef[..., Any]] = {}
    for dep in depends_on:
        if not isinstance(dep, TaskDef):
            hint = " (decorate it with @task)" if callable(dep) else ""
            raise InvalidTaskError(
                f"depends_on of task {name!r} contains {dep!r}, which is not a task{hint}"
            )
        unique.setdefault(id(dep), dep)
    return tuple(unique.values())


def needs_an_instance(candidate: object, method: str) -> TypeGuard[type]:
    """A class given where its instance belongs: its ``method`` is an instance method,
    which would fail unbound at the first call (static or class methods work as they are)."""
    return isinstance(candidate, type) and inspect.isfunction(
        inspect.getattr_static(candidate, method, None)
    )


def check_flag(option: str, value: object, error: type[Exception] = InvalidTaskError) -> bool:
    """A True/False option; anything else (a "false" read from a config file) is refused."""
    if not isinstance(value, bool):
        raise error(f"{option} must be True or False, got {value!r}")
    return value


def _check_map_over(
    name: str, map_over: Any, depends_on: tuple[TaskDef[..., Any], ...]
) -> str | None:
    """``map_over`` names one of the task's dependencies (by name or as the task itself)."""
    if map_over is None:
        return None
    deps = depends_on
    if isinstance(map_over, TaskDef):
        if not any(dep is map_over for dep in deps):
            raise InvalidTaskError(
                f"map_over of task {name!r} is task {map_over.name!r}, which is not in its "
                f"depends_on; add it there"
            )
        return map_over.name
    if not isinstance(map_over, str):
        raise InvalidTaskError(
            f"map_over of task {name!r} must name one of its dependencies, got {map_over!r}"
        )
    if map_over not in {dep.name for dep in deps}:
        listed = ", ".join(repr(dep.name) for dep in deps) or "nothing"
        raise InvalidTaskError(
            f"map_over={map_over!r} of task {name!r} is not one of its dependencies "
            f"(depends_on: {listed}); add that task to depends_on"
        )
    return map_over


def _check_retry(name: str, retry: int) -> int:
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise InvalidTaskError(
            f"retry of task {name!r} must be an int >= 0 (extra attempts), got {retry!r}"
        )
    return retry


def _check_non_negative(name: str, option: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidTaskError(
            f"{option} of task {name!r} must be a number >= 0, got {value!r}"
        )
    return value if value <= sys.float_info.max else math.inf  # an int beyond any float


def _check_timeout(name: str, timeout_s: float | None) -> float | None:
    if timeout_s is None:
        return None
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or math.isnan(timeout_s)
        or timeout_s <= 0
    ):
        raise InvalidTaskError(
            f"timeout_s of task {name!r} must be None or a number > 0, got {timeout_s!r}"
        )
    return float(timeout_s)


def _check_gate(name: str, option: str, gate: Gate | None) -> Gate | None:
    if gate is not None and not callable(gate):
        raise InvalidTaskError(
            f"{option}= of task {name!r} must be callable, got {gate!r}"
        )
    return gate


def _check_gate_calls(task: TaskDef[..., Any]) -> None:
    """Each gate can take what it will be given, checked before anything runs:
    ``when=`` and ``validate=`` the dependencies' values by name, ``retry_until=``
    the body's value."""
    by_name = {dep.name: None for dep in task.depends_on}
    values = f"the dependencies' values by name ({', '.join(by_name) or 'it has none'})"
    calls = [
        ("when", task.when, (), by_name, values),
        ("validate", task.validate, (), by_name, values),
        ("retry_until", task.retry_until, (None,), {}, "the body's value as its one argument"),
    ]
    for option, gate, args, kwargs, what in calls:
        if gate is None:
            continue
        try:
            signature = inspect.signature(gate)
        except (TypeError, ValueError):
            continue  # builtins and some C callables have no signature: trust the user
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise InvalidTaskError(
                f"{option}= of task {task.name!r} must take {what}, but {error}"
            ) from None


def _no_parameter_for(
    name: str,
    dep_name: str,
    parameters: Iterable[inspect.Parameter],
    accepted: set[str],
    provided: set[str],
) -> MissingParameterError:
    """The error for the dependency ``dep_name``, which no parameter of ``name`` receives."""
    if not dep_name.isidentifier() or keyword.iskeyword(dep_name):
        return MissingParameterError(
            f"task {name!r} depends on {dep_name!r}, which cannot be a parameter "
            f"name; receive it with **kwargs (as kwargs[{dep_name!r}]) or rename "
            f"that task with @task(name=...)"
        )
    unfed = [
        p.name
        for p in parameters
        if p.name in accepted and p.name not in provided and p.default is p.empty
    ]
    fix = "add one (or **kwargs) to receive its value"
    if len(unfed) == 1 and len(provided - accepted) == 1:  # the one meant for it
        fix = (
            f"a dependency's value arrives under the dependency's name: rename the "
            f"parameter {unfed[0]!r} to {dep_name!r} (or add one, or **kwargs)"
        )
    return MissingParameterError(
        f"task {name!r} depends on {dep_name!r} but its function has no "
        f"parameter {dep_name!r}; {fix}"
    )


def _check_parameters(
    name: str, fn: Callable[..., Any], depends_on: tuple[TaskDef[..., Any], ...]
) -> None:
    """Every dependency needs a keyword parameter, and every required one a dependency."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # builtins and some C callables have no signature: trust the user
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        accepted = None
    else:
        accepted = {
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
    provided = {dep.name for dep in depends_on}
    positional_only = {p.name for p in parameters if p.kind is p.POSITIONAL_ONLY}
    for dep_name in sorted(provided & positional_only):  # **kwargs would take it instead
        raise MissingParameterError(
            f"task {name!r} depends on {dep_name!r} but its parameter {dep_name!r} is "
            f"positional-only, and dependencies are passed by keyword; remove the '/'"
        )
    if accepted is not None:
        for dep_name in sorted(provided - accepted):
            raise _no_parameter_for(name, dep_name, parameters, accepted, provided)
    for position, p in enumerate(parameters):
        required = p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        if required and p.name not in provided and position == 0 and p.name in ("self", "cls"):
            raise MissingParameterError(
                f"task {name!r} has a required parameter {p.name!r}: @task cannot bind a "
                f"method declared in a class body; decorate the bound method instead, e.g. "
                f"task(instance.{getattr(fn, '__name__', 'method')}), or give {p.name!r} a default"
            )
        if required and p.name not in provided:
            raise MissingParameterError(
                f"task {name!r} has a required parameter {p.name!r} that no dependency "
                f"provides; add a task named {p.name!r} to depends_on or give it a default"
            )
