"""Docs stay true to the code: every setting documented, no documented setting that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from polyqueue.settings import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_page_lists_exactly_the_settings() -> None:
    page = (DOCS / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \| `POLYQUEUE_", page, flags=re.M))
    assert documented == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert field.description and field.description in page, name
