"""Quick constructors build ordinary frozen dataclass instances."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from flowing import InstanceFinished, StepResult, StepState, TaskFinished, TaskStarted
from flowing._events import make_finished, make_instance_finished, make_started
from flowing._frozen import quick_constructor
from flowing._results import make_result

RESULT = StepResult("load", StepState.SUCCEEDED, value=[1, 2], attempts=1, started_at=1.0)
CASES: list[tuple[Callable[..., Any], type, tuple[Any, ...], dict[str, Any]]] = [
    (make_result, StepResult, ("load", StepState.FAILED), {"error": KeyError("x"), "attempts": 2}),
    (make_started, TaskStarted, ("load", 0, 3, 12.5, 1, 3), {}),
    (make_finished, TaskFinished, ("load", 0, 3, 12.5), {"result": RESULT}),
    (make_instance_finished, InstanceFinished, ("load[1]", 0, 3, 12.5, 1, RESULT), {}),
]


@pytest.fixture(params=CASES, ids=lambda case: case[1].__name__)
def built(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """(quickly built, normally built) instances from the same arguments."""
    make, cls, args, kwargs = request.param
    return make(*args, **kwargs), cls(*args, **kwargs)


def test_a_quick_instance_is_of_the_class_and_equal_to_a_normal_one(built: tuple[Any, Any]) -> None:
    quick, normal = built
    assert type(quick) is type(normal)
    assert quick == normal
    assert repr(quick) == repr(normal)


def test_a_quick_instance_is_frozen(built: tuple[Any, Any]) -> None:
    quick, _ = built
    name = dataclasses.fields(quick)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(quick, name, "changed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(quick, name)


def test_a_quick_instance_pickles_and_replaces_like_a_normal_one(built: tuple[Any, Any]) -> None:
    quick, normal = built
    first = dataclasses.fields(quick)[0].name
    renamed = {first: "other"}
    assert dataclasses.replace(quick, **renamed) == dataclasses.replace(normal, **renamed)
    if not isinstance(quick, StepResult):  # its ValueError would not compare equal once pickled
        assert pickle.loads(pickle.dumps(quick)) == normal


def test_a_quick_result_takes_the_defaults_of_the_dataclass() -> None:
    assert make_result("load", StepState.SKIPPED) == StepResult("load", StepState.SKIPPED)


def test_quick_events_hash_like_normal_ones() -> None:
    assert hash(make_started("a", 0, 1, 2.0, 1, 1)) == hash(TaskStarted("a", 0, 1, 2.0, 1, 1))


def test_a_quick_constructor_rejects_the_arguments_the_class_rejects() -> None:
    with pytest.raises(TypeError):
        make_started("load", 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        make_result("load", StepState.SUCCEEDED, colour="red")  # type: ignore[call-arg]


def test_a_default_factory_gives_each_instance_its_own_value() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Bag:
        items: list[int] = dataclasses.field(default_factory=list)

    make_bag = quick_constructor(Bag)
    first, second = make_bag(), make_bag()
    first.items.append(1)
    assert second.items == [] and type(first) is Bag


@pytest.mark.parametrize(
    "field",
    [dataclasses.field(default=0, init=False), dataclasses.field(default=0, kw_only=True)],
    ids=["init-false", "kw-only"],
)
def test_a_field_the_plain_constructor_would_build_differently_is_refused(field: Any) -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Odd:
        name: str
        extra: int = field

    with pytest.raises(TypeError, match="extra"):
        quick_constructor(Odd)


def test_a_post_init_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        name: str

        def __post_init__(self) -> None: ...

    with pytest.raises(TypeError, match="__post_init__"):
        quick_constructor(Checked)


def test_a_quick_constructor_takes_the_parameters_of_the_class() -> None:
    quick = inspect.signature(make_result).parameters
    normal = inspect.signature(StepResult).parameters
    assert [(p.name, p.default) for p in quick.values()] == [(p.name, p.default) for p in normal.values()]


def test_a_field_named_like_the_constructors_own_variables_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Clash:
        _quick_builder: int

    with pytest.raises(TypeError, match="shadows"):
        quick_constructor(Clash)
