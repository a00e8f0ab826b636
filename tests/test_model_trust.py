"""Model trust: a model file whose architecture carries code is refused on every load path before
Keras deserializes it (a real Lambda layer that writes a file, which must stay unwritten); a
registered artifact whose `model.keras` or `metadata.json` changed, or whose registry row has no
hashes, is refused at load; workers load only from under the models folder."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ModelError
from core.settings import Settings
from core.storage.reader import Reader
from db.repository import register_model
from db.session import make_engine, make_sessionmaker, upgrade
from tests.support.cli import run_cli
from training.artifacts import METADATA_FILE, MODEL_FILE, load_artifact, load_keras_model
from training.metadata import InputMetadata, ModelMetadata, read_metadata, write_metadata
from training.registry import register_artifact, trust_artifact
from training.train import TrainOutcome
from training.trust import artifact_hashes, check_model_file
from worker.state import ProcessState

LAMBDA_VERSION = "20990101-000000-000"


def build_lambda_model(marker: Path, directory: Path) -> dict[str, Path]:
    """A real Keras model whose Lambda layer writes `marker` when it is built or called; saved as
    `.keras`, `.h5` and an artifact folder. The marker written while building is removed."""
    import keras
    from keras import layers

    # The path is a constant inside the bytecode Keras stores: loading runs it as written.
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")
    inputs = keras.Input((48, 48, 3))
    hidden = layers.Lambda(payload)(layers.Rescaling(1 / 255)(inputs))
    outputs = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(hidden))
    model = keras.Model(inputs, outputs)
    directory.mkdir(parents=True, exist_ok=True)
    files = {"keras": directory / "lambda.keras", "h5": directory / "lambda.h5"}
    model.save(files["keras"])
    model.save(files["h5"])
    artifact = directory / "models" / "tiny" / LAMBDA_VERSION
    artifact.mkdir(parents=True)
    shutil.copy(files["keras"], artifact / MODEL_FILE)
    metadata = ModelMetadata(
        name="tiny",
        version=LAMBDA_VERSION,
        class_names=["happy", "sad"],
        head="softmax",
        input=InputMetadata(height=48, width=48, color_mode="rgb"),
    )
    write_metadata(artifact, metadata)
    files["artifact"] = artifact
    marker.unlink()
    return files


@pytest.fixture(scope="module")
def lambda_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lambda")
    marker = root / "code-ran"
    return marker, build_lambda_model(marker, root)


def sqlite_sessions(settings: Settings) -> sessionmaker[Session]:
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    return make_sessionmaker(make_engine(settings.effective_database_url))


def worker_state(settings: Settings) -> ProcessState:
    engine = make_engine(settings.effective_database_url)
    return ProcessState(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        reader=Reader(max_file_bytes=1 << 20, allowed_roots=[], s3=settings.s3),
        pool=ThreadPoolExecutor(1),
    )


# --- code in the file ----------------------------------------------------------------------------


def test_the_payload_is_live_when_safety_is_off(tmp_path: Path) -> None:
    """The control: the same kind of file does run its code if loaded with safe_mode off."""
    marker = tmp_path / "control-ran"
    files = build_lambda_model(marker, tmp_path)
    script = (
        "import sys, keras; keras.saving.load_model(sys.argv[1], compile=False, safe_mode=False)"
    )
    subprocess.run([sys.executable, "-c", script, str(files["keras"])], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_a_lambda_layer_is_refused_before_keras_reads_the_file(
    lambda_files: tuple[Path, dict[str, Path]], kind: str
) -> None:
    marker, files = lambda_files
    with pytest.raises(ModelError, match="Lambda layer, which runs Python code"):
        check_model_file(files[kind])
    with pytest.raises(ModelError, match="Lambda layer"):
        load_keras_model(files[kind])
    assert not marker.exists()


def test_artifact_load_and_registration_refuse_a_lambda(
    lambda_files: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    marker, files = lambda_files
    artifact = files["artifact"]
    with pytest.raises(ModelError, match="Lambda layer"):
        load_artifact(artifact, artifact.parent.parent, "tiny")
    settings = Settings(home=tmp_path / "state", models_dir=artifact.parent.parent.parent)
    sessions = sqlite_sessions(settings)
    with sessions.begin() as session, pytest.raises(ModelError, match="Lambda layer"):
        register_artifact(session=session, directory=artifact, activate=True)
    assert not marker.exists()


def test_a_worker_refuses_a_registered_lambda(
    lambda_files: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """Even with a registry row whose hashes match (written straight into the database)."""
    marker, files = lambda_files
    artifact = files["artifact"]
    settings = Settings(home=tmp_path / "state", models_dir=artifact.parent.parent.parent)
    sessions = sqlite_sessions(settings)
    hashes = artifact_hashes(artifact)
    with sessions.begin() as session:
        register_model(
            session=session, version=LAMBDA_VERSION, name="tiny",
            artifact_path=str(artifact.resolve()), class_names=["happy", "sad"],
            model_sha256=hashes.model_sha256, metadata_sha256=hashes.metadata_sha256,
        )  # fmt: skip
    with pytest.raises(ModelError, match="Lambda layer"):
        worker_state(settings).runner(LAMBDA_VERSION, str(artifact.resolve()))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_import_model_refuses_a_lambda_through_the_cli(
    lambda_files: tuple[Path, dict[str, Path]], tmp_path: Path, kind: str
) -> None:
    marker, files = lambda_files
    models = tmp_path / "models"
    result = run_cli(
        ["import-model", str(files[kind]), "--classes", "happy,sad"],
        env={"EMOLABEL_HOME": str(tmp_path / "state"), "EMOLABEL_MODELS_DIR": str(models)},
    )
    assert result.returncode != 0
    assert "Lambda layer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not any(models.rglob(MODEL_FILE))


def test_import_model_still_imports_a_plain_model(tiny_model: TrainOutcome, tmp_path: Path) -> None:
    """The sandboxed reader converts a clean file, and the result loads and registers."""
    models = tmp_path / "models"
    result = run_cli(
        ["import-model", str(tiny_model.artifact_dir / MODEL_FILE), "--classes", "happy,sad",
         "--name", "imported"],
        env={"EMOLABEL_HOME": str(tmp_path / "state"), "EMOLABEL_MODELS_DIR": str(models)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (directory,) = (models / "imported").iterdir()
    assert load_artifact(directory, models, "imported").metadata.class_names == ["happy", "sad"]


def test_a_non_keras_module_in_the_config_is_refused(tmp_path: Path) -> None:
    """The CVE-2025-1550 shape: a config naming a function from another module."""
    import zipfile

    path = tmp_path / "gadget.keras"
    config = {"module": "keras.layers", "class_name": "Dense", "config": {
        "units": 2, "activation": {"module": "builtins", "class_name": "function",
                                   "config": "exec", "registered_name": "exec"}}}  # fmt: skip
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
    with pytest.raises(ModelError, match=r"builtins\.function, which is not part of Keras"):
        check_model_file(path)


# --- hashes and where artifacts live -------------------------------------------------------------


@pytest.fixture
def registered(
    tiny_model: TrainOutcome, tmp_path: Path
) -> Iterator[tuple[Settings, sessionmaker[Session], Path, str]]:
    """A copy of the tiny model under a fresh models folder, registered and active."""
    settings = Settings(home=tmp_path / "state", models_dir=tmp_path / "models")
    version = tiny_model.metadata.version
    directory = settings.models_dir / "tiny" / version
    shutil.copytree(tiny_model.artifact_dir, directory)
    sessions = sqlite_sessions(settings)
    with sessions.begin() as session:
        row = register_artifact(session=session, directory=directory, activate=True)
        assert row.model_sha256 == hashlib.sha256((directory / MODEL_FILE).read_bytes()).hexdigest()
        assert (
            row.metadata_sha256
            == hashlib.sha256((directory / METADATA_FILE).read_bytes()).hexdigest()
        )
    yield settings, sessions, directory, version


def test_a_worker_loads_an_untouched_registered_model(
    registered: tuple[Settings, sessionmaker[Session], Path, str],
) -> None:
    settings, _, directory, version = registered
    runner = worker_state(settings).runner(version, str(directory.resolve()))
    assert list(runner.class_names) == ["happy", "sad"]


def test_reversed_class_names_are_refused(
    registered: tuple[Settings, sessionmaker[Session], Path, str],
) -> None:
    settings, _, directory, version = registered
    metadata = read_metadata(directory)
    # write_metadata keeps the model hash right: only the registry can tell.
    write_metadata(directory, metadata.model_copy(update={"class_names": ["sad", "happy"]}))
    with pytest.raises(
        ModelError, match=r"metadata.json: its SHA-256 hash .* recorded in the registry"
    ):
        worker_state(settings).runner(version, str(directory.resolve()))


def test_a_changed_model_file_is_refused(
    registered: tuple[Settings, sessionmaker[Session], Path, str],
) -> None:
    settings, _, directory, version = registered
    with (directory / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(
        ModelError, match=r"model.keras: its SHA-256 hash .* recorded in metadata.json"
    ):
        worker_state(settings).runner(version, str(directory.resolve()))
    # And with metadata.json rewritten to match the new file, the registry still refuses it.
    write_metadata(directory, read_metadata(directory))
    with pytest.raises(ModelError, match="recorded in the registry"):
        worker_state(settings).runner(version, str(directory.resolve()))


def test_a_row_without_hashes_is_refused_until_an_operator_trusts_it(
    registered: tuple[Settings, sessionmaker[Session], Path, str],
) -> None:
    settings, sessions, directory, version = registered
    from db.models import ModelVersion

    with sessions.begin() as session:
        row = session.get(ModelVersion, version)
        assert row is not None
        row.model_sha256 = row.metadata_sha256 = None
    with pytest.raises(ModelError, match=r"records no SHA-256.*models trust"):
        worker_state(settings).runner(version, str(directory.resolve()))
    with sessions.begin() as session:
        trust_artifact(session=session, version=version, models_dir=settings.models_dir)
    worker_state(settings).runner(version, str(directory.resolve()))


def test_a_metadata_without_model_hash_is_refused(
    registered: tuple[Settings, sessionmaker[Session], Path, str],
) -> None:
    _, _, directory, _ = registered
    raw = json.loads((directory / METADATA_FILE).read_text())
    (directory / METADATA_FILE).write_text(json.dumps(raw | {"model_sha256": ""}))
    with pytest.raises(ModelError, match=r"metadata\.json records no SHA-256"):
        load_artifact(directory, directory.parent.parent, "tiny")


def test_a_worker_refuses_an_artifact_outside_the_models_folder(
    registered: tuple[Settings, sessionmaker[Session], Path, str], tmp_path: Path
) -> None:
    settings, sessions, directory, version = registered
    outside = tmp_path / "elsewhere" / version
    shutil.copytree(directory, outside)
    hashes = artifact_hashes(outside)
    from db.models import ModelVersion

    with sessions.begin() as session:
        row = session.get(ModelVersion, version)
        assert row is not None
        row.artifact_path = str(outside)
        row.model_sha256, row.metadata_sha256 = hashes.model_sha256, hashes.metadata_sha256
    with pytest.raises(ModelError, match="outside the models folder"):
        worker_state(settings).runner(version, str(outside))
    # A symlink inside the models folder that points out of it is refused the same way.
    link = settings.models_dir / "tiny" / "linked"
    link.symlink_to(outside, target_is_directory=True)
    with sessions.begin() as session:
        row = session.get(ModelVersion, version)
        assert row is not None
        row.artifact_path = str(link)
    with pytest.raises(ModelError, match="outside the models folder"):
        worker_state(settings).runner(version, str(link))


def test_promote_show_and_trust_through_the_cli(tiny_model: TrainOutcome, tmp_path: Path) -> None:
    models = tmp_path / "models"
    directory = models / "tiny" / tiny_model.metadata.version
    shutil.copytree(tiny_model.artifact_dir, directory)
    env = {"EMOLABEL_HOME": str(tmp_path / "state"), "EMOLABEL_MODELS_DIR": str(models)}
    outside = shutil.copytree(tiny_model.artifact_dir, tmp_path / "elsewhere")
    refused = run_cli(["models", "promote", str(outside)], env=env)
    assert refused.returncode != 0 and "outside the models folder" in refused.stderr
    assert run_cli(["models", "promote", str(directory)], env=env).returncode == 0
    shown = run_cli(["models", "show", tiny_model.metadata.version], env=env)
    registry = json.loads(shown.stdout)["registry"]
    assert registry["model_sha256"] == artifact_hashes(directory).model_sha256
    trusted = run_cli(["models", "trust", tiny_model.metadata.version], env=env)
    assert trusted.returncode == 0, trusted.stderr
    assert registry["metadata_sha256"] in trusted.stdout
