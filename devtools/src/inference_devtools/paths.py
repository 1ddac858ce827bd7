"""Where the checkout keeps what the tests, benchmarks and scripts read.

The package is installed editable from ``devtools/`` (``make venv``), so this file lies inside the
checkout and the repository root is found from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

REPO_ROOT: Final[Path] = Path(__file__).resolve().parents[3]
"""The repository root (``devtools/src/inference_devtools/`` is three levels below it)."""

TEST_MODEL: Final[Path] = REPO_ROOT / "models" / "test" / "best.pt"
"""The test model: ``scripts/train_test_model.py`` writes it; tests, demos and benchmarks read it
from here."""
