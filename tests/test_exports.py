import types

import flowing


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(flowing).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)  # flowing.dask
    }
    assert set(flowing.__all__) - {"__version__"} == public


def test_every_exported_name_resolves() -> None:
    for name in flowing.__all__:
        assert getattr(flowing, name) is not None, name


def test_version_is_a_release_string() -> None:
    assert flowing.__version__.count(".") == 2
