"""Run a docs page's examples: its ```python blocks marked ``<!-- run -->`` run in order as one script.

    python -m tests.docs_runner docs/enqueueing.md

Top-level ``await`` is allowed (as in ``python -m asyncio``), so a page can show
``await enqueue(...)`` without wrapping every block in a function. The page reads the
database from ``POLYQUEUE_DATABASE_URL`` (a ``postgresql+asyncpg://`` URL).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import types
from pathlib import Path

_BLOCK = re.compile(r"^<!-- run -->\n```python\n(.*?)^```$", re.M | re.S)


def runnable_blocks(page: Path) -> list[str]:
    """The source of each ``<!-- run -->`` python block of ``page``, in order."""
    return [m.group(1) for m in _BLOCK.finditer(page.read_text())]


def page_source(page: Path) -> str:
    """The page's runnable blocks as one script whose line numbers are the page's own."""
    text = page.read_text()
    source = ""
    for match in _BLOCK.finditer(text):
        first_line = text.count("\n", 0, match.start(1))
        source += "\n" * (first_line - source.count("\n")) + match.group(1)
    return source


def run_page(page: Path) -> None:
    source = page_source(page)
    code = compile(source, str(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    # A real module, so libraries that look names up in sys.modules (SQLAlchemy's
    # declarative annotations, pydantic's forward references) find the page's names.
    module = types.ModuleType("__main__")
    module.__file__ = str(page)
    sys.modules["__main__"] = module
    namespace = module.__dict__
    if code.co_flags & inspect.CO_COROUTINE:
        asyncio.run(eval(code, namespace))  # a coroutine, because of top-level await
    else:
        exec(code, namespace)


if __name__ == "__main__":
    run_page(Path(sys.argv[1]))
