"""How the journal turns a task's value into text and back: pickle, JSON, or your own."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ._exceptions import FlowDefinitionError
from ._task import needs_an_instance


@runtime_checkable
class Serializer(Protocol):
    """Turns values into text for the journal and back.

    ``name`` is stored with every record; records written under another name are
    not read back, so switching serializers never feeds one the other's data.
    ``dumps`` may raise for a value it cannot represent: that value is then
    simply not journaled.
    """

    name: str

    def dumps(self, value: Any) -> str: ...

    def loads(self, data: str) -> Any: ...


class PickleSerializer:
    """Any picklable value, as base64 text.

    Loading runs pickle: only read journals you (or your own code) wrote.
    """

    name = "pickle"

    def dumps(self, value: Any) -> str:
        import base64
        import pickle

        return base64.b64encode(pickle.dumps(value, protocol=pickle.DEFAULT_PROTOCOL)).decode()

    def loads(self, data: str) -> Any:
        import base64
        import pickle

        return pickle.loads(base64.b64decode(data, validate=True))


class JsonSerializer:
    """Plain data only (dicts with string keys, lists, str, int, float, bool, None).

    A value that would not come back equal (a tuple, an int dict key, NaN) is
    refused, and so not journaled, rather than replayed changed.
    """

    name = "json"

    def dumps(self, value: Any) -> str:
        import json

        data = json.dumps(value, allow_nan=False, separators=(",", ":"))
        if not _same(json.loads(data), value):
            raise ValueError(
                f"{type(value).__name__} value would not survive a JSON round trip unchanged"
            )
        return data

    def loads(self, data: str) -> Any:
        import json

        return json.loads(data)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (so 1 != 1.0 != True, list != tuple)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


_BUILTIN: dict[str, type[PickleSerializer] | type[JsonSerializer]] = {
    "pickle": PickleSerializer,
    "json": JsonSerializer,
}


def resolve_serializer(serializer: str | Serializer) -> Serializer:
    """``"pickle"``, ``"json"`` or an object with ``name``, ``dumps`` and ``loads``."""
    if isinstance(serializer, str):
        if serializer in _BUILTIN:
            return _BUILTIN[serializer]()
    elif needs_an_instance(serializer, "dumps"):
        raise FlowDefinitionError(
            f"serializer is the class {serializer.__name__}; pass an instance: "
            f"serializer={serializer.__name__}()"
        )
    elif isinstance(serializer, Serializer) and isinstance(serializer.name, str):
        return serializer
    raise FlowDefinitionError(
        f"serializer must be 'pickle', 'json' or an object with a str name and "
        f"dumps/loads methods, got {serializer!r}"
    )
