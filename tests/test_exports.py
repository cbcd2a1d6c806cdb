import importlib
import inspect
import subprocess
import sys
import types

import pytest

import flowing
from flowing._stream import DEFAULT_BUFFER


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name in dir(flowing)
        if not name.startswith("_")
        and not isinstance(getattr(flowing, name), types.ModuleType)  # flowing.dask
    }
    assert set(flowing.__all__) - {"__version__"} == public


def test_every_exported_name_resolves() -> None:
    for name in flowing.__all__:
        assert getattr(flowing, name) is not None, name


@pytest.mark.parametrize("name", sorted(flowing._LAZY))
def test_a_lazy_name_is_the_object_its_module_defines(name: str) -> None:
    module = importlib.import_module(flowing._LAZY[name], "flowing")
    assert getattr(flowing, name) is getattr(module, name)
    assert name in flowing.__all__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        flowing.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_version_is_a_release_string() -> None:
    assert flowing.__version__.count(".") == 2


def test_the_events_buffer_default_is_the_streams() -> None:
    default = inspect.signature(flowing.Flow.events).parameters["buffer"].default
    assert default == DEFAULT_BUFFER


# What `import flowing` must not load (issue 5: import in under 60 ms). Optional
# dependencies load only when used; the engine only when a flow runs (or asks for
# it); what building a Flow needs, only when a Flow is built.
OPTIONAL = ["rich", "matplotlib", "dask", "distributed", "opentelemetry", "cloudpickle"]
NOT_EVEN_TO_BUILD = ["asyncio", "trio", "json", "hashlib", "pickle", "flowing._timeline", "flowing._render"]
ENGINE = [
    "flowing._scheduler",
    "flowing._attempt",
    "flowing._threads",
    "flowing._executor",
    "flowing._mapping",
    "flowing._cache",
    "flowing._journal",
    "flowing._keys",
    "flowing._signals",
    "flowing._progress",
    "flowing._otel",
    "flowing.cli",
    "flowing.dask",
]
TO_BUILD = [
    "anyio",
    "logging",
    "flowing._graph",
    "flowing._serializers",
    "flowing._events",
    "flowing._stream",
    "flowing._recorder",
]

DECLARE = "import flowing\n"
BUILD = DECLARE + "@flowing.task\ndef step() -> None: ...\nflowing.Flow(step)\n"


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    code += "import sys\nprint(*sys.modules, sep='\\n')"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def after_import() -> set[str]:
    return _modules_after(DECLARE)


@pytest.fixture(scope="module")
def after_building_a_flow() -> set[str]:
    return _modules_after(BUILD)


@pytest.mark.parametrize("module", OPTIONAL + NOT_EVEN_TO_BUILD + ENGINE + TO_BUILD)
def test_import_flowing_does_not_load(module: str, after_import: set[str]) -> None:
    loaded = {m for m in after_import if m == module or m.startswith(module + ".")}
    assert not loaded, f"`import flowing` loads {sorted(loaded)}"


@pytest.mark.parametrize("module", OPTIONAL + NOT_EVEN_TO_BUILD + ENGINE)
def test_building_a_flow_does_not_load(module: str, after_building_a_flow: set[str]) -> None:
    loaded = {m for m in after_building_a_flow if m == module or m.startswith(module + ".")}
    assert not loaded, f"declaring a task and building a Flow loads {sorted(loaded)}"


def test_building_a_flow_loads_what_it_needs(after_building_a_flow: set[str]) -> None:
    """The check of the checks above: the fresh interpreter really built a Flow."""
    assert {m for m in TO_BUILD if m.startswith("flowing.")} <= after_building_a_flow
