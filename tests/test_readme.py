"""The README's Python examples run as they are written.

A block that is a fragment of a larger program (it uses names from a block it
does not import, or needs a running event loop or a cluster) is marked in the
README with ``<!-- skip: next -->`` and says so in its text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sybil import Document, Example
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = list(Document.parse(str(ROOT / "README.md"), PythonCodeBlockParser(), SkipParser()))


def test_the_readme_has_python_examples() -> None:
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: f"line-{example.line}")
def test_readme_example_runs(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files (a journal, a picture)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # `from etl import ...`
    example.evaluate()
