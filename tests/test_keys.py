"""Step keys: content-addressed, chained, blind to cosmetics, stable across processes."""

from __future__ import annotations

import fractions
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowing import Flow, StepKeyError, TaskDef, compute_step_key, task


def key(t: TaskDef[..., Any], **deps: str) -> str:
    return compute_step_key(t, deps)


def base() -> TaskDef[..., Any]:
    @task
    def step(x: int = 1) -> int:
        return [x * 2 for _ in range(3)][0]

    return step


COSMETIC: dict[str, Callable[[], TaskDef[..., Any]]] = {}


def cosmetic(case: Callable[[], TaskDef[..., Any]]) -> Callable[[], TaskDef[..., Any]]:
    COSMETIC[case.__name__] = case
    return case


@cosmetic
def renamed_function() -> TaskDef[..., Any]:
    @task
    def another_name(x: int = 1) -> int:
        return [x * 2 for _ in range(3)][0]

    return another_name


@cosmetic
def knobs() -> TaskDef[..., Any]:
    @task(
        retry=5,
        retry_backoff_base_ms=1,
        retry_max_backoff_ms=2,
        timeout_s=9,
        name="renamed",
    )
    def step(x: int = 1) -> int:
        return [x * 2 for _ in range(3)][0]

    return step


@cosmetic
def detached() -> TaskDef[..., Any]:
    @task(detached=True)
    def step(x: int = 1) -> int:
        return [x * 2 for _ in range(3)][0]

    return step


@cosmetic
def moved_and_commented() -> TaskDef[..., Any]:
    # A comment, a blank line and a different line number change nothing.

    @task
    def step(x: int = 1) -> int:
        # another comment
        return [x * 2 for _ in range(3)][0]

    return step


EDITS: dict[str, Callable[[], TaskDef[..., Any]]] = {}


def edit(case: Callable[[], TaskDef[..., Any]]) -> Callable[[], TaskDef[..., Any]]:
    EDITS[case.__name__] = case
    return case


@edit
def constant_changed() -> TaskDef[..., Any]:
    @task
    def step(x: int = 1) -> int:
        return [x * 3 for _ in range(3)][0]

    return step


@edit
def operator_changed() -> TaskDef[..., Any]:
    @task
    def step(x: int = 1) -> int:
        return [x + 2 for _ in range(3)][0]

    return step


@edit
def default_changed() -> TaskDef[..., Any]:
    @task
    def step(x: int = 2) -> int:
        return [x * 2 for _ in range(3)][0]

    return step


@edit
def parameter_renamed() -> TaskDef[..., Any]:
    @task
    def step(y: int = 1) -> int:
        return [y * 2 for _ in range(3)][0]

    return step


@edit
def attribute_changed() -> TaskDef[..., Any]:
    @task
    def step(x: int = 1) -> int:
        return [math.floor(x * 2) for _ in range(3)][0]

    return step


@edit
def gate_added() -> TaskDef[..., Any]:
    @task(when=lambda: True)
    def step(x: int = 1) -> int:
        return [x * 2 for _ in range(3)][0]

    return step


@edit
def made_async() -> TaskDef[..., Any]:
    @task
    async def step(x: int = 1) -> int:
        return [x * 2 for _ in range(3)][0]

    return step


@edit
def closed_over_constant() -> TaskDef[..., Any]:
    factor = 2

    @task
    def step(x: int = 1) -> int:
        return [x * factor for _ in range(3)][0]

    return step


def helper() -> int:
    return 1


def edited_helper() -> int:
    return 2


def with_globals(**namespace: Any) -> TaskDef[..., Any]:
    """A task whose body reads the globals ``LIMIT`` and ``helper`` from ``namespace``."""

    def step() -> Any:
        return helper() * LIMIT  # type: ignore[name-defined]  # noqa: F821

    body = types.FunctionType(step.__code__, {"__name__": __name__, **namespace}, "step")
    return task(body)


@pytest.mark.parametrize(
    "one, other, same",
    [
        ({"LIMIT": 3, "helper": helper}, {"LIMIT": 3, "helper": helper}, True),
        ({"LIMIT": 3, "helper": helper}, {"LIMIT": 4, "helper": helper}, False),
        ({"LIMIT": 3, "helper": helper}, {"LIMIT": 3, "helper": edited_helper}, False),
        ({"LIMIT": [3], "helper": helper}, {"LIMIT": [4], "helper": helper}, True),
        ({"LIMIT": 3, "helper": math.floor}, {"LIMIT": 3, "helper": math.ceil}, True),
    ],
    ids=[
        "unchanged",
        "plain-constant-global-edited",
        "same-module-helper-edited",
        "list-global-is-not-keyed",
        "function-from-another-module-is-not-keyed",
    ],
)
def test_globals_in_the_key_are_plain_constants_and_functions_of_the_same_module(
    one: dict[str, Any], other: dict[str, Any], same: bool
) -> None:
    assert (key(with_globals(**one)) == key(with_globals(**other))) is same


threshold = 1


def reads_after_a_builtin() -> int:
    return abs(threshold)


def reads_in_nested_code() -> int:
    return (lambda: threshold)()


def reads_beside_nested_code() -> int:
    return threshold + (lambda: 1)()


@pytest.mark.parametrize(
    "body", [reads_after_a_builtin, reads_in_nested_code, reads_beside_nested_code]
)
def test_a_plain_global_is_keyed_wherever_the_code_reads_it(body: Callable[[], int]) -> None:
    def with_threshold(value: int) -> TaskDef[..., Any]:
        namespace = {"__name__": __name__, "threshold": value}
        return task(types.FunctionType(body.__code__, namespace, body.__name__))

    assert key(with_threshold(1)) != key(with_threshold(2))


def countdown(n: int) -> int:
    return 0 if n <= 0 else countdown(n - 1)


def test_a_recursive_helper_is_keyed_without_endless_recursion() -> None:
    assert key(task(lambda: countdown(3), name="step")) == key(
        task(lambda: countdown(3), name="step")
    )


def closing_over(value: object) -> TaskDef[..., Any]:
    unset: int

    def step() -> object:
        return unset if value is None else value

    return task(step)


@pytest.mark.parametrize(
    "one, other, same",
    [
        (0.5, 0.25, False),
        (1j, 2j, False),
        (b"a", b"b", False),
        ((1, "a"), (1, "b"), False),
        (frozenset({1, 2}), frozenset({1, 3}), False),
        (frozenset([1, 9]), frozenset([9, 1]), True),
        ((1, [2]), (1, [3]), True),
    ],
    ids=[
        "float",
        "complex",
        "bytes",
        "tuple",
        "frozenset",
        "frozenset-in-any-order",
        "tuple-holding-a-list-is-opaque",
    ],
)
def test_closed_over_plain_constants_of_every_kind_are_keyed_beside_an_empty_cell(
    one: object, other: object, same: bool
) -> None:
    assert (key(closing_over(one)) == key(closing_over(other))) is same


def test_a_keyword_only_default_is_in_the_key() -> None:
    assert key(task(lambda *, x=1: x, name="step")) != key(task(lambda *, x=2: x, name="step"))


class Greeter:
    def hello(self) -> str:
        return "hello"


class Shouter:
    def hello(self) -> str:
        return "HELLO"


def test_a_bound_method_is_keyed_by_its_function() -> None:
    assert key(task(Greeter().hello)) == key(task(Greeter().hello))
    assert key(task(Greeter().hello)) != key(task(Shouter().hello))


def test_a_builtin_gate_is_keyed_by_its_name() -> None:
    def step() -> int:
        return 1

    assert key(task(retry_until=bool)(step)) == key(task(retry_until=bool)(step))
    assert key(task(retry_until=bool)(step)) != key(task(retry_until=callable)(step))


def test_a_dependency_name_with_a_lone_surrogate_is_keyed() -> None:
    odd = task(lambda: 1, name="\ud800")
    after = task(depends_on=[odd])(lambda **kwargs: kwargs)
    assert len(key(after, **{"\ud800": "k"})) == 64


def test_only_a_task_has_a_step_key() -> None:
    with pytest.raises(TypeError, match="needs a task, got <built-in function len>"):
        compute_step_key(len, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("case", COSMETIC.values(), ids=COSMETIC.keys())
def test_cosmetic_changes_keep_the_key(case: Callable[[], TaskDef[..., Any]]) -> None:
    assert key(case()) == key(base())


@pytest.mark.parametrize("case", EDITS.values(), ids=EDITS.keys())
def test_edits_to_the_code_change_the_key(case: Callable[[], TaskDef[..., Any]]) -> None:
    assert key(case()) != key(base())


def test_a_gate_edit_changes_the_key() -> None:
    def make(limit: int) -> TaskDef[..., Any]:
        @task(retry_until=lambda v: v > limit)
        def step() -> int:
            return 1

        return step

    assert key(make(1)) == key(make(1))
    assert key(make(1)) != key(make(2))


def test_the_key_chains_through_dependency_names_and_keys() -> None:
    @task
    def a() -> int:
        return 1

    @task(depends_on=[a])
    def b(a: int) -> int:
        return a

    assert key(b, a="k1") == key(b, a="k1")
    assert key(b, a="k1") != key(b, a="k2")


def test_mapping_over_a_dependency_changes_the_key() -> None:
    @task
    def src() -> list[int]:
        return [1, 2]

    def make(**options: Any) -> TaskDef[..., Any]:
        @task(depends_on=[src], **options)
        def each(src: Any) -> Any:
            return src

        return each

    assert key(make(), src="k") == key(make(max_concurrency=None), src="k")
    assert key(make(), src="k") != key(make(map_over="src"), src="k")


def test_wrong_dependency_keys_are_refused_by_name() -> None:
    @task
    def a() -> int:
        return 1

    @task(depends_on=[a])
    def b(a: int) -> int:
        return a

    with pytest.raises(ValueError, match=r"'b' must name exactly its dependencies \['a'\]"):
        key(b)


@pytest.mark.parametrize("dependency_key", [None, 3, b"k"], ids=["None", "int", "bytes"])
def test_a_dependency_key_that_is_no_key_is_refused_naming_the_dependency(
    dependency_key: Any,
) -> None:
    """flow.step_keys() gives None for a task without a key: its dependents have none
    either, so ``"dep:a=None"`` must not become a key shared by every such task."""

    @task
    def a() -> int:
        return 1

    @task(depends_on=[a])
    def b(a: int) -> int:
        return a

    with pytest.raises(ValueError) as caught:
        compute_step_key(b, {"a": dependency_key})
    assert str(caught.value) == (
        f"dependency_keys of task 'b' must map each dependency to its step key (a "
        f"str), got {dependency_key!r} for 'a'; a dependency without a key "
        f"(None in flow.step_keys()) leaves its dependents without one too"
    )


@pytest.mark.parametrize(
    "fn, culprit",
    [
        (functools.partial(lambda x: x, 1), "not a plain function"),
        (lambda x=object(): x, "a default of the body is object"),
        (lambda *, x=object(): x, "a default of the body is object"),
        (fractions.Fraction, "not a plain function"),
    ],
    ids=["partial", "object-default", "keyword-only-object-default", "class-from-another-module"],
)
def test_code_without_a_fingerprint_raises_step_key_error(fn: Any, culprit: str) -> None:
    t = task(fn, name="odd")
    with pytest.raises(StepKeyError, match=f"task 'odd' has no step key: .*{culprit}"):
        key(t)


def with_an_object_default(x: object = object()) -> object:
    return x


def _closing_over_the_culprit() -> Any:
    inner = with_an_object_default

    def body() -> object:
        return inner()

    return body


def plain_body() -> int:
    return 0


@pytest.mark.parametrize(
    "body, gates, culprit",
    [
        (_closing_over_the_culprit(), {}, "a default of the body"),
        (lambda: with_an_object_default(), {}, "a default of the body"),
        (functools.wraps(with_an_object_default)(lambda: 0), {}, "a default of the body"),
        (plain_body, {"when": functools.partial(bool, True)}, "its when functools.partial"),
        (plain_body, {"retry_until": lambda v, limit=[1]: v}, "a default of the retry_until"),
    ],
    ids=["closed-over-function", "same-module-global", "wrapped-function", "gate", "gate-default"],
)
def test_a_step_key_error_names_the_body_or_gate_it_was_reached_from(
    body: Callable[[], Any], gates: dict[str, Any], culprit: str
) -> None:
    with pytest.raises(StepKeyError, match=culprit):
        key(task(name="odd", **gates)(body))


def test_a_decorated_body_is_keyed_by_its_inner_function() -> None:
    def logged(fn: Callable[[], int]) -> Callable[[], int]:
        @functools.wraps(fn)
        def wrapper() -> int:
            return fn()

        return wrapper

    @task
    @logged
    def one() -> int:
        return 1

    @task
    @logged
    def two() -> int:
        return 2

    assert key(one) != key(two)


def test_flow_step_keys_leave_overridden_tasks_and_their_dependents_uncached() -> None:
    @task
    def a() -> int:
        return 1

    @task(depends_on=[a])
    def b(a: int) -> int:
        return a

    @task
    def c() -> str:
        return "c"

    flow = Flow(b, c)
    assert None not in flow.step_keys().values()
    flow.override(a, 5)
    keys = flow.step_keys()
    assert keys["a"] is None and keys["b"] is None and keys["c"] is not None


def test_tasks_sharing_a_key_in_one_flow_are_not_cached(caplog: pytest.LogCaptureFixture) -> None:
    def make(name: str, payload: object) -> TaskDef[..., Any]:
        def body() -> object:
            return payload

        return task(body, name=name)

    flow = Flow(make("x", object()), make("y", object()), make("z", "plain"))
    keys = flow.step_keys()
    assert keys["x"] is None and keys["y"] is None and keys["z"] is not None
    assert "have the same step key" in caplog.text
    assert "'x'" in caplog.text and "'y'" in caplog.text


KEYS_SCRIPT = textwrap.dedent(
    """
    import json
    from flowing import Flow, task

    def make(tag):
        @task(name="t_" + tag)
        def step(x=1.5):
            return x in {"a", "b", "c", 3, (1, 2)} and tag
        return step

    @task(depends_on=[make("one")])
    def last(t_one):
        return {k: v for k, v in sorted(globals().items())}

    print(json.dumps(Flow(last).step_keys()))
    """
)


def test_keys_are_the_same_in_processes_with_different_hash_seeds(tmp_path: Path) -> None:
    script = tmp_path / "keys.py"
    script.write_text(KEYS_SCRIPT)
    outputs = []
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    assert None not in outputs[0].values()
