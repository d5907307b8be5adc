"""The docs' extension examples run as written: every ``python`` block of the page, in order,
in one namespace (their own asserts check what the page says they do)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", ["extending.md", "when-a-step-goes-wrong.md"])
def test_the_pages_python_blocks_run(page: str) -> None:
    blocks = python_blocks(DOCS / page)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)
