"""The settings object: environment parsing, validation, and the README table kept true."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, load_settings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_matches_the_code() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table().strip(), "run: emolabel settings --table"


def test_environment_with_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOLABEL_TRAIN__EPOCHS", "7")
    monkeypatch.setenv("EMOLABEL_LIMITS__MAX_PIXELS", "1000")
    monkeypatch.setenv("EMOLABEL_MODELS_DIR", "/tmp/elsewhere")
    settings = Settings()
    assert settings.train.epochs == 7
    assert settings.limits.max_pixels == 1000
    assert settings.models_dir == Path("/tmp/elsewhere")


def test_bad_values_become_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOLABEL_TRAIN__BATCH_SIZE", "-1")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_settings()


def test_precision_is_float32_unless_asked_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().worker.precision == "float32"
    monkeypatch.setenv("EMOLABEL_WORKER__PRECISION", "bfloat16")
    assert load_settings().worker.precision == "bfloat16"
    monkeypatch.setenv("EMOLABEL_WORKER__PRECISION", "float16")
    with pytest.raises(ConfigError, match=r"worker\.precision"):
        load_settings()


def test_split_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        load_settings(train={"split": (0.5, 0.2, 0.1)})


def test_home_and_models_must_differ(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="different"):
        load_settings(home=tmp_path, models_dir=tmp_path)
