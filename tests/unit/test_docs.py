"""docs/operations.md: its settings table is the code's, its links and commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inference_devtools import settings_doc
from inference_service.settings import Settings, env_name, settings_table

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"


def test_settings_block_matches_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert settings_doc.render(text) == text, (
        "docs/operations.md's settings table drifted from settings.py: "
        "run .venv/bin/python scripts/gen_docs.py"
    )
    for name in Settings.model_fields:
        assert f"`{env_name(name)}`" in text


def test_render_replaces_only_the_block() -> None:
    g = settings_doc
    text = f"intro\n{g.BEGIN}\nold table\n{g.END}\noutro\n"
    out = g.render(text, table="| new |")
    assert out == f"intro\n{g.BEGIN}\n| new |\n{g.END}\noutro\n"
    assert g.render(g.render(text)) == g.render(text)  # idempotent
    with pytest.raises(g.MarkerError):
        g.render("no markers")


def test_the_table_is_the_settings_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert settings_table() in text


def test_relative_links_point_at_files() -> None:
    text = DOC.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (DOC.parent / target).exists(), f"broken link: {target}"


def test_readme_links_the_operations_guide() -> None:
    assert "docs/operations.md" in (ROOT / "README.md").read_text(encoding="utf-8")
