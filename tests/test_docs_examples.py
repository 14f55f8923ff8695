"""Every Python code block of the README and of docs/ runs.

Blocks of one page run in order in one namespace (a page reads as one session), which starts with
the small stand-ins in ``docs_namespace`` for the names the prose leaves to the reader (``model``,
``loader``, ``evaluate``...). A block that cannot run here (a GPU, several ranks, a download) is
preceded by an HTML comment ``<!-- skip: why -->``, which the rendered page does not show; a skip
without a reason is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from .docs_namespace import docs_namespace

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip(?::\s*(?P<why>.*?))?\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line, code, skip reason or None) for each ```python fence of a Markdown text."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("info").strip().split(" ")[0] not in ("python", "py"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        why: str | None = None
        if skip:
            why = (skip.group("why") or "").strip()
            if not why:
                raise AssertionError(f"line {line}: a skipped block must say why: <!-- skip: reason -->")
        indent = len(m.group("indent"))
        body = "\n".join(ln[indent:] for ln in m.group("body").splitlines())
        blocks.append((line, body, why))
    return blocks


def test_skip_marker_is_read() -> None:
    text = "a\n<!-- skip: needs a GPU -->\n```python\nraise SystemExit\n```\n\n```python\nx = 1\n```\n"
    assert python_blocks(text) == [(3, "raise SystemExit", "needs a GPU"), (7, "x = 1", None)]
    with pytest.raises(AssertionError, match="must say why"):
        python_blocks("<!-- skip -->\n```python\nx = 1\n```\n")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    runnable = [(line, code) for line, code, why in blocks if why is None]
    if not runnable:
        pytest.skip("no runnable Python block")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    ns: dict[str, Any] = docs_namespace()
    for line, code in runnable:
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"{page.relative_to(ROOT)}, the block at line {line} failed: {e!r}") from e
    assert os.getcwd() == str(tmp_path)
