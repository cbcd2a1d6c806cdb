"""The @task decorator: forms, direct calls, and rejection of bad declarations."""

from __future__ import annotations

import functools
import gc
import inspect
import re
from typing import Any

import pytest

from flowing import Flow, InvalidTaskError, MissingParameterError, TaskDef, task
from flowing._task import registered_detached_tasks


@task
def source() -> int:
    return 1


def not_a_task() -> None: ...


def test_bare_decorator_makes_a_task_named_after_the_function() -> None:
    assert isinstance(source, TaskDef)
    assert source.name == "source"
    assert source.depends_on == ()


def test_a_task_is_still_callable_as_the_plain_function() -> None:
    @task(depends_on=[source])
    def double(source: int) -> int:
        return source * 2

    assert double(21) == 42


def test_a_task_called_with_keywords_passes_them_to_the_function() -> None:
    @task(depends_on=[source])
    def double(source: int) -> int:
        return source * 2

    assert double(source=21) == 42


@pytest.mark.parametrize("timeout_s", [0.5, 2])
def test_a_timeout_is_kept_as_a_float(timeout_s: float) -> None:
    assert task(timeout_s=timeout_s)(not_a_task).timeout_s == float(timeout_s)


def test_a_bare_task_has_the_documented_defaults() -> None:
    bare = task(not_a_task)
    assert (bare.retry, bare.retry_backoff_base_ms, bare.retry_max_backoff_ms) == (0, 1000, 30_000)
    assert (bare.timeout_s, bare.retry_on, bare.retry_jitter, bare.pool) == (None, None, 0.0, None)
    assert (bare.detached, bare.local, bare.cache) == (False, False, False)
    assert (bare.when, bare.validate, bare.retry_until, bare.map_over) == (None, None, None, None)


@pytest.mark.parametrize(
    ("fn", "options", "message"),
    [
        (42, {}, "@task needs a function, got 42"),
        (functools.partial(not_a_task), {}, "has no __name__; pass @task(name=...)"),
    ],
    ids=["not-callable", "no-name"],
)
def test_a_task_needs_a_function_and_a_name(fn: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTaskError, match=re.escape(message)):
        task(fn, **options)


def test_a_named_callable_without_a_name_of_its_own_is_a_task() -> None:
    assert task(functools.partial(not_a_task), name="partial").name == "partial"


def test_a_task_shows_its_functions_signature() -> None:
    assert inspect.signature(source) == inspect.signature(source.fn)


def test_name_option_overrides_the_function_name() -> None:
    @task(name="renamed")
    def original() -> None: ...

    assert original.name == "renamed"


def test_a_single_task_is_accepted_as_depends_on() -> None:
    @task(depends_on=source)
    def child(source: int) -> int:
        return source

    assert child.depends_on == (source,)


def test_repeated_dependencies_are_kept_once() -> None:
    @task(depends_on=[source, source])
    def child(source: int) -> int:
        return source

    assert child.depends_on == (source,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": -1}, "retry of task 'bad' must be an int >= 0"),
        ({"retry": 1.5}, "retry of task 'bad' must be an int >= 0"),
        ({"retry": True}, "retry of task 'bad' must be an int >= 0"),
        ({"timeout_s": 0}, "timeout_s of task 'bad' must be None or a number > 0"),
        ({"timeout_s": -1.0}, "timeout_s of task 'bad' must be None or a number > 0"),
        ({"timeout_s": float("nan")}, "timeout_s of task 'bad'"),
        ({"timeout_s": "5"}, "timeout_s of task 'bad'"),
        ({"retry_backoff_base_ms": -1}, "retry_backoff_base_ms of task 'bad' must be a number >= 0"),
        ({"retry_max_backoff_ms": -5}, "retry_max_backoff_ms of task 'bad' must be a number >= 0"),
        ({"retry_backoff_base_ms": True}, "retry_backoff_base_ms of task 'bad' must be a number >= 0"),
        ({"retry_max_backoff_ms": "5"}, "retry_max_backoff_ms of task 'bad' must be a number >= 0"),
        ({"when": True}, "when= of task 'bad' must be callable"),
        ({"validate": "yes"}, "validate= of task 'bad' must be callable"),
        ({"retry_until": 3}, "retry_until= of task 'bad' must be callable"),
        ({"depends_on": [not_a_task]}, "which is not a task (decorate it with @task)"),
        ({"depends_on": [42]}, "depends_on of task 'bad' contains 42, which is not a task"),
        ({"depends_on": "source"}, "depends_on of task 'bad' must be a list of tasks"),
        ({"name": ""}, "task name must be a non-empty string"),
        ({"detached": "false"}, "detached of task 'bad' must be True or False, got 'false'"),
        ({"local": 1}, "local of task 'bad' must be True or False, got 1"),
        ({"max_concurrency": 0}, "max_concurrency of task 'bad' must be None or an int >= 1"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_bad_options_are_rejected_with_a_message_naming_the_task(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidTaskError) as caught:

        @task(**options)
        def bad(**kwargs: Any) -> None: ...

    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 3}, "unknown option 'timeout' for task 'body'; did you mean 'timeout_s'? "),
        ({"depend_on": []}, "unknown option 'depend_on' for task 'body'; did you mean 'depends_on'? "),
        ({"retries": 2}, "unknown option 'retries' for task 'body'; did you mean 'retry'? "),
        ({"name": "named", "colour": "red"}, "unknown option 'colour' for task 'named'; its options"),
    ],
    ids=["timeout", "depend_on", "retries", "no-close-match"],
)
@pytest.mark.parametrize("form", ["decorator", "call"])
def test_an_unknown_option_is_rejected_naming_the_task_and_the_option_meant(
    options: dict[str, Any], message: str, form: str
) -> None:
    def body() -> None: ...

    with pytest.raises(InvalidTaskError) as caught:
        task(**options)(body) if form == "decorator" else task(body, **options)
    assert message in str(caught.value)
    assert str(caught.value).endswith(
        "its options are cache, depends_on, detached, local, map_over, max_concurrency, "
        "name, pool, retry, retry_backoff_base_ms, retry_jitter, retry_max_backoff_ms, "
        "retry_on, retry_until, timeout_s, validate, when"
    )


@pytest.mark.parametrize(
    "redeclare",
    [lambda t: task(t), lambda t: task(retry=2)(t), lambda t: TaskDef(t)],
    ids=["bare", "with-options", "TaskDef"],
)
def test_decorating_a_task_again_is_rejected_naming_it_and_the_fix(
    redeclare: Any,
) -> None:
    with pytest.raises(InvalidTaskError) as caught:
        redeclare(source)
    assert str(caught.value) == (
        "task 'source' is already a task: declare it once, with every option in one "
        "@task(...), or decorate its plain function (its .fn) again under another name"
    )


@pytest.mark.parametrize("first", ["self", "cls"])
def test_a_method_decorated_in_its_class_is_rejected_with_the_bound_method_as_the_fix(
    first: str,
) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def method({first}): return 1", namespace)
    with pytest.raises(MissingParameterError) as caught:
        task(namespace["method"])
    assert str(caught.value) == (
        f"task 'method' has a required parameter {first!r}: @task cannot bind a method "
        f"declared in a class body; decorate the bound method instead, e.g. "
        f"task(instance.method), or give {first!r} a default"
    )


def test_a_classmethod_decorated_in_its_class_is_rejected_with_the_bound_method_as_the_fix() -> None:
    with pytest.raises(InvalidTaskError) as caught:

        class Loader:
            @task  # type: ignore[arg-type]
            @classmethod
            def load(cls) -> int:
                return 1

    assert str(caught.value) == (
        "@task cannot bind the classmethod 'load' in its class body; decorate the bound "
        "method once the class exists instead, e.g. task(TheClass.load)"
    )


def area(self: Any) -> int:
    return 1


@pytest.mark.parametrize(
    ("fn", "options", "shown"),
    [(area, {}, "area"), (functools.partial(area), {"name": "area"}, "method")],
    ids=["named-function", "nameless-callable"],
)
def test_the_method_fix_names_the_method_when_it_can(
    fn: Any, options: dict[str, Any], shown: str
) -> None:
    with pytest.raises(MissingParameterError, match=re.escape(f"e.g. task(instance.{shown}), or")):
        task(fn, **options)


@pytest.mark.parametrize(
    "fn", [lambda self=None: 1, lambda x=1, cls=dict: 1], ids=["self-with-default", "cls-not-first"]
)
def test_a_self_or_cls_parameter_with_a_default_is_an_ordinary_parameter(fn: Any) -> None:
    assert task(fn, name="plain").name == "plain"


def test_an_unknown_option_on_a_nameless_callable_names_it_by_its_repr() -> None:
    nameless = functools.partial(not_a_task)
    with pytest.raises(InvalidTaskError, match=re.escape(f"for task {repr(nameless)!r}; ")):
        task(nameless, colour="red")


def test_an_async_generator_function_is_rejected_before_it_could_succeed_unrun() -> None:
    async def stream() -> Any:
        yield 1

    with pytest.raises(InvalidTaskError) as caught:
        task(stream)
    assert str(caught.value) == (
        "task 'stream' is an async generator function, which flowing cannot await; "
        "collect its items in an async def task and return them, e.g. as a list"
    )


def test_only_a_callable_dependency_is_told_to_decorate_it_with_task() -> None:
    with pytest.raises(InvalidTaskError) as caught:
        task(depends_on=[42])(lambda **kwargs: None)  # type: ignore[list-item]
    assert str(caught.value).endswith("which is not a task")


def test_a_dependency_without_a_parameter_is_rejected() -> None:
    with pytest.raises(MissingParameterError, match="'lonely' depends on 'source'.*no parameter 'source'"):

        @task(depends_on=[source])
        def lonely() -> None: ...


def _positional(source: int, /) -> int:
    return source


def _positional_and_kwargs(source: int, /, **others: int) -> int:
    return source


@pytest.mark.parametrize(
    "positional", [_positional, _positional_and_kwargs], ids=["alone", "with-kwargs"]
)
def test_a_positional_only_parameter_for_a_dependency_is_rejected_saying_why(
    positional: Any,
) -> None:
    with pytest.raises(MissingParameterError) as caught:
        task(depends_on=[source], name="positional")(positional)

    assert str(caught.value) == (
        "task 'positional' depends on 'source' but its parameter 'source' is "
        "positional-only, and dependencies are passed by keyword; remove the '/'"
    )


def test_a_dependency_received_under_another_name_suggests_the_rename() -> None:
    with pytest.raises(MissingParameterError) as caught:

        @task(depends_on=[source])
        def double(value: int) -> int:
            return value * 2

    assert str(caught.value) == (
        "task 'double' depends on 'source' but its function has no parameter 'source'; "
        "a dependency's value arrives under the dependency's name: rename the parameter "
        "'value' to 'source' (or add one, or **kwargs)"
    )


@pytest.mark.parametrize("dep_name", ["fetch-data", "class", "2nd"])
def test_a_dependency_whose_name_cannot_be_a_parameter_points_to_kwargs(dep_name: str) -> None:
    upstream = task(name=dep_name)(lambda: 1)
    with pytest.raises(MissingParameterError) as caught:

        @task(depends_on=[upstream])
        def downstream(data: int = 0) -> int:
            return data

    assert str(caught.value) == (
        f"task 'downstream' depends on {dep_name!r}, which cannot be a parameter name; "
        f"receive it with **kwargs (as kwargs[{dep_name!r}]) or rename that task with "
        f"@task(name=...)"
    )


def test_a_required_parameter_without_a_dependency_is_rejected() -> None:
    with pytest.raises(MissingParameterError, match="required parameter 'missing'"):

        @task
        def needy(missing: int) -> None: ...


def test_kwargs_absorbs_every_dependency() -> None:
    @task(depends_on=[source])
    def absorbing(**kwargs: int) -> int:
        return sum(kwargs.values())

    assert absorbing.depends_on == (source,)


def test_parameters_with_defaults_need_no_dependency() -> None:
    @task
    def optional(x: int = 3) -> int:
        return x

    assert optional() == 3


@pytest.mark.parametrize(
    ("base", "cap", "expected"),
    [(1000, 30_000, [1000, 2000, 4000, 8000]), (100, 250, [100, 200, 250, 250]), (0, 10, [0, 0, 0, 0])],
)
def test_backoff_doubles_per_failed_attempt_up_to_the_cap(base: int, cap: int, expected: list[int]) -> None:
    @task(retry=4, retry_backoff_base_ms=base, retry_max_backoff_ms=cap)
    def flaky() -> None: ...

    assert [flaky.backoff_ms(k) for k in range(1, 5)] == expected


@pytest.mark.parametrize(
    ("base", "failed_attempt", "expected"),
    [(0.0, 1100, 0.0), (1000, 5000, 30_000.0), (10**400, 1, 30_000.0)],
    ids=["zero-base-float", "late-attempt", "base-beyond-any-float"],
)
def test_backoff_of_any_attempt_stays_at_the_cap(base: float, failed_attempt: int, expected: float) -> None:
    @task(retry=failed_attempt, retry_backoff_base_ms=base)
    def flaky() -> None: ...

    assert flaky.backoff_ms(failed_attempt) == expected


@task
def second() -> int:
    return 2


class _AsyncCallable:
    async def __call__(self) -> int:
        return 1


async def _one(x: int = 1) -> int:
    return x


@pytest.mark.parametrize(
    "fn",
    [_one, functools.partial(_one, 1), _AsyncCallable()],
    ids=["async-def", "partial-of-async-def", "object-with-async-call"],
)
def test_async_callables_are_recognised(fn: Any) -> None:
    assert task(fn, name="coro").is_async and not source.is_async


def test_an_object_with_an_async_call_runs_as_an_async_task() -> None:
    assert Flow(task(_AsyncCallable(), name="fetch")).run()["fetch"].value == 1


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        ({"when": lambda: True}, "when= of task 'gated' must take the dependencies' values by name (source)"),
        ({"validate": lambda other: True}, "validate= of task 'gated' must take the dependencies'"),
        ({"retry_until": lambda: True, "retry": 1}, "retry_until= of task 'gated' must take the body's value"),
        ({"retry_until": lambda v, w: True, "retry": 1}, "missing a required argument: 'w'"),
    ],
    ids=["when-without-parameters", "validate-wrong-name", "retry-until-without-value", "retry-until-two"],
)
def test_a_gate_that_cannot_take_its_arguments_is_rejected_before_anything_runs(
    gates: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidTaskError, match=re.escape(message)):

        @task(depends_on=[source], **gates)
        def gated(source: int) -> int:
            return source


@pytest.mark.parametrize(
    ("depends_on", "listed"),
    [([], "(it has none)"), ([source, second], "(source, second)")],
    ids=["no-dependencies", "two-dependencies"],
)
def test_a_rejected_gate_is_told_the_names_it_would_get(depends_on: list[Any], listed: str) -> None:
    with pytest.raises(InvalidTaskError, match=re.escape(f"values by name {listed}, but")):
        task(depends_on=depends_on, when=lambda unknown: True)(lambda **kwargs: None)


@pytest.mark.parametrize(
    ("depends_on", "listed"),
    [([], "nothing"), ([source, second], "'source', 'second'")],
    ids=["no-dependencies", "two-dependencies"],
)
def test_a_map_over_that_is_not_a_dependency_is_told_the_dependencies(
    depends_on: list[Any], listed: str
) -> None:
    with pytest.raises(InvalidTaskError, match=re.escape(f"(depends_on: {listed}); add that")):
        task(depends_on=depends_on, map_over="items")(lambda **kwargs: None)


def test_a_gate_without_a_signature_is_trusted_and_the_next_gate_still_checked() -> None:
    with pytest.raises(InvalidTaskError, match="validate= of task 'gated'"):

        @task(depends_on=[source], when=min, validate=lambda other: True)
        def gated(source: int) -> int:
            return source


def test_gates_taking_kwargs_or_defaults_are_accepted() -> None:
    @task(depends_on=[source], when=lambda **values: True, validate=lambda source, extra=0: True)
    def gated(source: int) -> int:
        return source

    assert gated.when is not None and gated.validate is not None


def test_the_detached_registry_does_not_keep_tasks_alive() -> None:
    def make() -> None:
        @task(depends_on=[source], detached=True)
        def side(source: int) -> None: ...

        assert side in registered_detached_tasks()

    make()
    gc.collect()
    assert registered_detached_tasks() == []
