"""JSON Schemas of task and result records (``task.schema.json``, ``result.schema.json``)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load(name: str) -> dict[str, Any]:
    """A schema by name: ``task`` or ``result``."""
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
