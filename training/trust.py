"""What makes a model file safe to load: no layer that carries code, known hashes, a known folder.

Keras' `safe_mode` has been bypassed again and again (CVE-2025-1550, -8747, -9905, -9906), so it is
one guard, not the only one. Before Keras sees a file, `check_model_file` reads its architecture as
plain JSON (`config.json` inside a `.keras` zip, the `model_config` attribute of an `.h5`) and
refuses any layer that carries Python code (`Lambda`'s bytecode, a SavedModel or a torch module
called at inference) and any object from a module outside Keras (a function reference such as
`builtins.exec`). `artifact_hashes` covers `model.keras` and `metadata.json`, which the registry
stores and every worker load checks; `artifact_under` keeps the registry from pointing a worker at
a folder outside the models folder. Standard library only (h5py is imported for `.h5` files): the
producer imports this through `training.registry` without TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelError

METADATA_FILE = "metadata.json"
MODEL_FILE = "model.keras"
# Layers whose config is code, or names code that runs when the layer is built or called:
# bytecode (Lambda, `__lambda__`), a TensorFlow SavedModel (TFSMLayer), a torch or JAX module.
CODE_LAYERS = frozenset(
    {"Lambda", "__lambda__", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer"}
)
# A real architecture is kilobytes; a config.json past this is refused before it is parsed.
MAX_CONFIG_BYTES = 32 << 20


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArtifactHashes:
    """SHA-256 of an artifact's `model.keras` and `metadata.json`, as the registry stores them."""

    model_sha256: str | None
    metadata_sha256: str | None


def artifact_hashes(directory: Path) -> ArtifactHashes:
    """Hash the two files of an artifact folder; a missing file is a `ModelError`."""
    try:
        return ArtifactHashes(
            file_sha256(directory / MODEL_FILE), file_sha256(directory / METADATA_FILE)
        )
    except OSError as error:
        raise ModelError(f"{directory}: cannot hash the artifact ({error})") from None


REGISTRY = "the registry"


def check_hash(path: Path, actual: str, expected: str | None, what: str) -> None:
    """Refuse a file whose hash is unknown or differs from the one recorded by `what`."""
    if not expected:
        hint = (
            "a version registered before emolabel recorded hashes: check its files, then run "
            "`emolabel models trust VERSION`"
            if what == REGISTRY
            else "save or import the model again"
        )
        raise ModelError(
            f"{path}: {what} records no SHA-256 for this file, so it cannot be verified ({hint})"
        )
    if actual != expected:
        when = "registered" if what == REGISTRY else "saved"
        raise ModelError(
            f"{path}: its SHA-256 hash {actual[:12]}… differs from {expected[:12]}… recorded in "
            f"{what}; the file was changed after it was {when}"
        )


def artifact_under(directory: Path, models_dir: Path) -> Path:
    """`directory` resolved (symlinks followed), refused unless it lies under `models_dir`.

    Its `model.keras` and `metadata.json` are checked too: a symlinked file may escape as well.
    """
    try:
        root = models_dir.resolve(strict=True)
        resolved = directory.resolve(strict=True)
    except OSError as error:
        raise ModelError(f"{directory}: no such model folder ({error.strerror or error})") from None
    files = [(resolved / name).resolve() for name in (MODEL_FILE, METADATA_FILE)]
    escaping = [
        path for path in (resolved, *files) if not path.is_relative_to(root) or path == root
    ]
    if escaping:
        raise ModelError(
            f"{directory}: refused, {escaping[0]} is outside the models folder {root}; "
            "workers load only artifacts under EMOLABEL_MODELS_DIR"
        )
    return resolved


def read_model_config(path: Path) -> Any:
    """The architecture of a `.keras` zip or an `.h5` file, parsed as JSON and nothing else."""
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return json.loads(_keras_config_text(path))
    if suffix in {".h5", ".hdf5"}:
        return json.loads(_h5_config_text(path))
    raise ModelError(f"{path}: not a .keras or .h5 model file")


def _keras_config_text(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelError(f"{path}: config.json is {info.file_size} bytes; refused")
            return archive.read(info)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ModelError(
            f"{path}: cannot load Keras model (not a .keras archive: {error})"
        ) from None


def _h5_config_text(path: Path) -> bytes:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
    except OSError as error:
        raise ModelError(f"{path}: cannot load Keras model (not an HDF5 file: {error})") from None
    if raw is None:
        raise ModelError(f"{path}: holds weights only, no model architecture")
    text = raw.encode() if isinstance(raw, str) else bytes(raw)
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelError(f"{path}: model_config is {len(text)} bytes; refused")
    return text


def _objects(config: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in `config`, without recursion: a deeply nested file cannot crash it."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def refuse_code(config: Any, path: Path) -> None:
    """Raise `ModelError` if the architecture names a code-carrying layer or a non-Keras module."""
    for item in _objects(config):
        class_name = item.get("class_name")
        if isinstance(class_name, str) and class_name in CODE_LAYERS:
            raise ModelError(
                f"{path}: refused, it contains a {class_name} layer, which runs Python code "
                "stored in the file; emolabel loads only models built from Keras' own layers"
            )
        module = item.get("module")
        if isinstance(module, str) and not (module == "keras" or module.startswith("keras.")):
            raise ModelError(
                f"{path}: refused, it names {module}.{class_name}, which is not part of Keras; "
                "emolabel loads only models built from Keras' own layers"
            )


def check_model_file(path: Path) -> None:
    """Refuse, before any deserialization, a model file whose architecture carries code."""
    try:
        config = read_model_config(path)
    except (ValueError, RecursionError) as error:
        raise ModelError(f"{path}: unreadable model architecture ({error})") from None
    refuse_code(config, path)
