"""Bad input gives one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from training.train import TrainOutcome


def assert_one_clear_line(result: object, fragment: str) -> None:
    returncode = result.returncode  # type: ignore[attr-defined]
    stderr = result.stderr  # type: ignore[attr-defined]
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and fragment in lines[0], stderr


def test_missing_data_dir(tmp_path: Path) -> None:
    assert_one_clear_line(run_cli(["train", str(tmp_path / "nope")]), "no such folder")


def test_empty_data_dir(tmp_path: Path) -> None:
    assert_one_clear_line(run_cli(["train", str(tmp_path)]), "class")


def test_one_class_only(tmp_path: Path, sample_dir: Path) -> None:
    shutil.copytree(sample_dir / "happy", tmp_path / "happy")
    assert_one_clear_line(run_cli(["train", str(tmp_path)]), "at least 2")


def test_empty_class_folder(tmp_path: Path, sample_dir: Path) -> None:
    shutil.copytree(sample_dir / "happy", tmp_path / "happy")
    (tmp_path / "sad").mkdir()
    assert_one_clear_line(run_cli(["train", str(tmp_path)]), "sad")


def test_bad_setting(tmp_path: Path) -> None:
    result = run_cli(["train", str(tmp_path)], env={"EMOLABEL_TRAIN__EPOCHS": "zero"})
    assert_one_clear_line(result, "train.epochs")


@pytest.fixture()
def copied_artifact(tmp_path: Path, tiny_model: TrainOutcome) -> Path:
    target = tmp_path / "models" / "tiny" / tiny_model.artifact_dir.name
    shutil.copytree(tiny_model.artifact_dir, target)
    return target


def test_unreadable_model(copied_artifact: Path, sample_dir: Path) -> None:
    (copied_artifact / "model.keras").write_bytes(b"garbage")
    image = next((sample_dir / "happy").iterdir())
    assert_one_clear_line(run_cli(["predict", "--model", str(copied_artifact), str(image)]), "hash")
    metadata = json.loads((copied_artifact / "metadata.json").read_text())
    # An empty hash is no way around the check (issue 14): it is refused as unverifiable.
    metadata["model_sha256"] = ""
    (copied_artifact / "metadata.json").write_text(json.dumps(metadata))
    result = run_cli(["predict", "--model", str(copied_artifact), str(image)])
    assert_one_clear_line(result, "cannot be verified")
    # With the garbage's own hash recorded, the file itself is what is refused.
    metadata["model_sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (copied_artifact / "metadata.json").write_text(json.dumps(metadata))
    result = run_cli(["predict", "--model", str(copied_artifact), str(image)])
    assert_one_clear_line(result, "cannot load Keras model")


def test_metadata_disagrees_with_output_width(copied_artifact: Path, sample_dir: Path) -> None:
    metadata = json.loads((copied_artifact / "metadata.json").read_text())
    metadata["class_names"] = ["happy", "sad", "angry"]
    metadata["head"] = "softmax"
    (copied_artifact / "metadata.json").write_text(json.dumps(metadata))
    image = next((sample_dir / "happy").iterdir())
    result = run_cli(["predict", "--model", str(copied_artifact), str(image)])
    assert_one_clear_line(result, "does not match metadata")


def test_missing_model(tmp_path: Path, sample_dir: Path) -> None:
    image = next((sample_dir / "happy").iterdir())
    result = run_cli(["predict", "--model", str(tmp_path / "none"), str(image)])
    assert_one_clear_line(result, "no such model")
    result = run_cli(["predict", str(image)], env={"EMOLABEL_MODELS_DIR": str(tmp_path)})
    assert_one_clear_line(result, "no trained model")


def test_bare_keras_file_is_not_an_artifact(tmp_path: Path, sample_dir: Path) -> None:
    (tmp_path / "m.h5").write_bytes(b"x")
    image = next((sample_dir / "happy").iterdir())
    result = run_cli(["predict", "--model", str(tmp_path / "m.h5"), str(image)])
    assert_one_clear_line(result, "import-model")


def test_every_command_has_help() -> None:
    for command in ["sample-data", "clean", "train", "evaluate", "predict", "import-model"]:
        result = run_cli([command, "--help"])
        assert result.returncode == 0 and "Usage" in result.stdout, command


def test_a_configured_database_behind_the_migrations_is_refused_then_upgraded(
    tmp_path: Path,
) -> None:
    # A configured database is never migrated behind the operator's back; the embedded default
    # is (tests/test_db.py::test_ready_schema_migrates_or_refuses_by_the_revision_alone).
    env = {
        "EMOLABEL_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "EMOLABEL_HOME": str(tmp_path / "home"),
    }
    assert_one_clear_line(run_cli(["status"], env=env), "run `emolabel db upgrade`")
    assert run_cli(["db", "upgrade"], env=env).returncode == 0
    assert run_cli(["db", "check"], env=env).returncode == 0
    shown = run_cli(["status"], env=env)
    assert shown.returncode == 0, shown.stderr
