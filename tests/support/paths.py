"""Where the tests find the repository (the emolabel command line runs from its root)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
