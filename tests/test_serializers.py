"""Serializers: pickle takes anything picklable, JSON only what comes back unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from flowing import FlowDefinitionError, JsonSerializer, PickleSerializer, Serializer
from flowing._serializers import resolve_serializer


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2.5, "text", [1, "a", None], {"k": [1, {"n": 2.0}]}],
    ids=["none", "bool", "int", "float", "str", "list", "nested"],
)
@pytest.mark.parametrize(
    "serializer", [PickleSerializer(), JsonSerializer()], ids=["pickle", "json"]
)
def test_plain_data_round_trips(serializer: Serializer, value: Any) -> None:
    back = serializer.loads(serializer.dumps(value))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize(
    "value",
    [(1, 2), {1: "a"}, float("nan"), {1, 2}, b"bytes", [1, (2,)]],
    ids=["tuple", "int-key", "nan", "set", "bytes", "nested-tuple"],
)
def test_json_refuses_values_that_would_come_back_changed(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        JsonSerializer().dumps(value)


def test_pickle_keeps_tuples_and_sets() -> None:
    serializer = PickleSerializer()
    assert serializer.loads(serializer.dumps(((1, 2), {3}))) == ((1, 2), {3})


class Upper:
    name = "upper"

    def dumps(self, value: Any) -> str:
        return str(value).upper()

    def loads(self, data: str) -> Any:
        return data


@pytest.mark.parametrize(
    "spec, expected",
    [("pickle", PickleSerializer), ("json", JsonSerializer), (Upper(), Upper)],
    ids=["pickle", "json", "custom"],
)
def test_a_serializer_is_chosen_by_name_or_given_as_an_object(spec: Any, expected: type) -> None:
    assert isinstance(resolve_serializer(spec), expected)


@pytest.mark.parametrize("spec", ["yaml", 3, object()], ids=["unknown-name", "int", "object"])
def test_anything_else_is_refused_naming_the_parameter(spec: Any) -> None:
    with pytest.raises(FlowDefinitionError, match="serializer must be 'pickle', 'json' or"):
        resolve_serializer(spec)


class UpperNamespace:
    """A serializer made of static methods: the class itself is the serializer."""

    name = "upper-namespace"

    @staticmethod
    def dumps(value: Any) -> str:
        return str(value).upper()

    @staticmethod
    def loads(data: str) -> Any:
        return data


def test_a_class_whose_methods_are_static_is_a_serializer_itself() -> None:
    assert resolve_serializer(UpperNamespace) is UpperNamespace


@pytest.mark.parametrize("cls", [JsonSerializer, PickleSerializer, Upper], ids=lambda c: c.__name__)
def test_a_serializer_class_instead_of_an_instance_is_refused_with_the_call_to_write(
    cls: type,
) -> None:
    """Its unbound ``dumps`` would refuse every value: nothing would be journaled."""
    with pytest.raises(FlowDefinitionError) as caught:
        resolve_serializer(cls)
    assert str(caught.value) == (
        f"serializer is the class {cls.__name__}; pass an instance: "
        f"serializer={cls.__name__}()"
    )
