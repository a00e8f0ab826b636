"""Rewrite the settings table in README.md from the code (`python scripts/readme_settings.py`)."""

from pathlib import Path

from core.settings import settings_table

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
readme.write_text(f"{head}{START}\n{settings_table()}\n{END}{tail}")
