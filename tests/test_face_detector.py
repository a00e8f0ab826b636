"""The face detector on real photos and real faces (all from registry wheels), on TF and JAX.

Images: scikit-image's `astronaut`, `coffee`, `chelsea`, `rocket` and `lfw_subset` (files inside
its wheel, not the ones its `pooch` fetcher downloads) and scikit-learn's `china.jpg` and
`flower.jpg`. The LFW scenes are `bench.detectors.lfw_scenes`: 100 real faces and 100 real
non-face patches pasted at known boxes into real photos, placed with a fixed seed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageOps

from bench.detectors import (
    ASTRONAUT_FACE,
    Scene,
    centred_in,
    lfw_scenes,
    matched,
    photos_without_faces,
)
from core.errors import ModelError
from training.faces import Box, Face, FaceDetectorConfig
from training.faces import boxes as box_math
from training.faces.mtcnn import MtcnnDetector, load_mtcnn, pyramid_scales
from training.faces.weights import _ArrayListUnpickler, read_weights


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return load_mtcnn()


@pytest.fixture(scope="module")
def face_scenes() -> list[Scene]:
    return lfw_scenes(faces=True, seed=0)


def boxes_of(faces: list[Face]) -> list[Box]:
    return [face.box for face in faces]


# --- the detector on real images ---------------------------------------------------------------


def test_astronaut_has_exactly_one_face_where_her_face_is(detector: MtcnnDetector) -> None:
    from skimage import data

    faces = detector.detect(data.astronaut())

    assert len(faces) == 1
    assert box_math.iou(faces[0].box, ASTRONAUT_FACE) >= 0.5
    assert faces[0].score >= 0.9
    assert faces[0].landmarks is not None and len(faces[0].landmarks) == 5
    left_eye, right_eye, nose, mouth_left, _ = faces[0].landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and nose[1] < mouth_left[1]


def test_photos_without_people_give_at_most_one_false_face(detector: MtcnnDetector) -> None:
    found = {name: detector.detect(photo) for name, photo in photos_without_faces().items()}

    assert sum(len(faces) for faces in found.values()) <= 1, found


def test_real_lfw_faces_in_scenes_are_found(
    detector: MtcnnDetector, face_scenes: list[Scene]
) -> None:
    total = sum(len(scene.boxes) for scene in face_scenes)
    found = sum(
        matched(scene.boxes, boxes_of(detector.detect(scene.image))) for scene in face_scenes
    )

    assert total == 100
    assert found >= 95, f"{found} of {total} faces found at IoU >= 0.5"


def test_lfw_non_face_patches_are_rarely_reported(detector: MtcnnDetector) -> None:
    scenes = lfw_scenes(faces=False, seed=0)
    reported = sum(
        centred_in(scene.boxes, boxes_of(detector.detect(scene.image))) for scene in scenes
    )

    assert reported <= 2, f"{reported} of 100 non-face patches reported as faces"


def test_an_exif_rotated_copy_gives_the_same_boxes(face_scenes: list[Scene]) -> None:
    # The boxes are under test, not the threshold: JPEG's artefacts differ between the copies,
    # and a face scored near `min_score` could come and go.
    detector = load_mtcnn(FaceDetectorConfig(min_score=0.5))
    scene = face_scenes[0]
    height, width = scene.image.shape[:2]
    upright = boxes_of(detector.detect(decoded(jpeg(scene.image))))
    assert matched(scene.boxes, upright) >= 18

    for orientation, stored in ((6, np.rot90(scene.image, 1)), (8, np.rot90(scene.image, -1))):
        turned = decoded(jpeg(np.ascontiguousarray(stored), orientation))
        assert turned.shape == scene.image.shape
        faces = boxes_of(detector.detect(turned))
        assert_same_boxes(faces, upright, tolerance=0.02 * max(width, height))
        # Mapped to the stored (sideways) pixels and back, the boxes are where they were.
        in_stored = box_math.stored(
            box_math.xywh_to_corners(box_math.as_array(faces)), orientation, width, height
        )
        back = box_math.oriented(in_stored, orientation, stored.shape[1], stored.shape[0])
        np.testing.assert_allclose(box_math.corners_to_xywh(back), faces, atol=1e-9)


def test_max_side_and_max_faces_keep_boxes_in_the_given_pixels(
    detector: MtcnnDetector, face_scenes: list[Scene]
) -> None:
    scene = face_scenes[1]
    smaller = load_mtcnn(FaceDetectorConfig(max_side=700, max_faces=5))
    faces = smaller.detect(scene.image)

    assert len(faces) == 5
    assert [face.score for face in faces] == sorted((face.score for face in faces), reverse=True)
    assert matched(scene.boxes, boxes_of(faces)) == 5  # in the 1400x900 scene's own pixels
    height, width = scene.image.shape[:2]
    for x, y, box_width, box_height in boxes_of(faces):
        assert x >= 0 and y >= 0 and x + box_width <= width and y + box_height <= height


def test_tiny_blank_and_wrong_images(detector: MtcnnDetector) -> None:
    assert detector.detect(np.zeros((8, 8, 3), dtype=np.uint8)) == []
    assert detector.detect(np.full((300, 200, 3), 128, dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64, 3), dtype=np.float32))  # type: ignore[arg-type]


@pytest.mark.slow
def test_jax_finds_the_same_boxes_as_tensorflow(
    detector: MtcnnDetector, face_scenes: list[Scene], tmp_path: Path
) -> None:
    from skimage import data

    assert detector.backend == "tensorflow"
    images = [data.astronaut(), face_scenes[2].image]
    on_tensorflow = [[[*face.box, face.score] for face in detector.detect(i)] for i in images]

    on_jax = detect_on_jax(images, tmp_path)

    for tensorflow_faces, jax_faces in zip(on_tensorflow, on_jax, strict=True):
        assert len(tensorflow_faces) == len(jax_faces) > 0
        np.testing.assert_allclose(
            np.asarray(jax_faces)[:, :4], np.asarray(tensorflow_faces)[:, :4], atol=0.5
        )
        np.testing.assert_allclose(
            np.asarray(jax_faces)[:, 4], np.asarray(tensorflow_faces)[:, 4], atol=1e-3
        )


JAX_SCRIPT = """
import json, sys
import numpy as np
from training.faces.mtcnn import load_mtcnn
detector = load_mtcnn(backend="jax")
images = np.load(sys.argv[1])
print(json.dumps({
    "backend": detector.backend,
    "faces": [[[*f.box, f.score] for f in detector.detect(images[key])] for key in sorted(images)],
}))
"""


def detect_on_jax(images: list[NDArray[np.uint8]], folder: Path) -> list[list[list[float]]]:
    path = folder / "images.npz"
    np.savez(path, **{f"image{index}": image for index, image in enumerate(images)})
    result = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
        timeout=600,
        check=True,
    )
    document = json.loads(result.stdout.strip().splitlines()[-1])
    assert document["backend"] == "jax"
    return list(document["faces"])


# --- configuration and weights ----------------------------------------------------------------


def test_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="min_face_size"):
        FaceDetectorConfig(min_face_size=8)
    with pytest.raises(ValueError, match="min_score"):
        FaceDetectorConfig(min_score=1.0)
    with pytest.raises(ValueError, match="max_faces"):
        FaceDetectorConfig(max_faces=0)
    with pytest.raises(ValueError, match="max_side"):
        FaceDetectorConfig(min_face_size=40, max_side=30)


def test_pyramid_starts_at_the_minimum_face_and_stops_where_the_window_fits() -> None:
    scales = pyramid_scales(480, 640, FaceDetectorConfig(min_face_size=24))

    assert scales[0] == pytest.approx(0.5)
    assert 480 * scales[-1] >= 12 > 480 * scales[-1] * 0.709
    assert pyramid_scales(20, 640, FaceDetectorConfig(min_face_size=24)) == []


def test_weights_are_read_from_the_wheel_without_importing_its_tensorflow_code() -> None:
    code = (
        "import sys; from training.faces.weights import read_weights\n"
        "shapes = [w.shape for w in read_weights('onet')]\n"
        "assert shapes[0] == (3, 3, 3, 32) and shapes[-1] == (2,), shapes\n"
        "assert 'mtcnn' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert read_weights("pnet")[0].shape == (3, 3, 3, 10)


def test_a_weights_file_that_would_run_code_is_refused() -> None:
    hostile = pickle.dumps([os.system])
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _ArrayListUnpickler(io.BytesIO(hostile)).load()
    with pytest.raises(ValueError, match="unknown network"):
        read_weights("xnet")
    assert issubclass(ModelError, Exception)


# --- box arithmetic -----------------------------------------------------------------------------


def test_suppression_keeps_the_best_of_overlapping_boxes() -> None:
    corners = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 5, 5]], float)
    scores = np.array([0.8, 0.9, 0.7, 0.6])

    assert box_math.suppress(corners, scores, 0.5).tolist() == [1, 2, 3]
    # Over the smaller box, a box inside another goes too.
    assert box_math.suppress(corners, scores, 0.5, over="min").tolist() == [1, 2]
    assert box_math.suppress(np.empty((0, 4)), np.empty(0), 0.5).tolist() == []


def test_squares_and_margin_crops_stay_inside_the_image() -> None:
    square = box_math.squared(np.array([[10.0, 20.0, 30.0, 60.0]]))
    np.testing.assert_allclose(square, [[0.0, 20.0, 40.0, 60.0]])

    assert box_math.margin_region((40, 40, 20, 40), 0.1, 100, 100) == (26, 36, 74, 84)
    assert box_math.margin_region((40, 40, 20, 40), 0.0, 100, 100, square=False) == (40, 40, 60, 80)
    assert box_math.margin_region((90, -5, 20, 20), 0.25, 100, 100) == (85, 0, 100, 20)
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    assert box_math.crop_with_margin(image, (0, 0, 10, 10), 0.5).shape == (15, 15, 3)
    with pytest.raises(ValueError, match="margin"):
        box_math.margin_region((0, 0, 1, 1), -0.1, 10, 10)


def oriented_pixels(stored: NDArray[np.uint8], orientation: int) -> NDArray[np.uint8]:
    """EXIF orientation applied by Pillow (what a viewer shows)."""
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_every_exif_orientation(orientation: int) -> None:
    stored = np.zeros((30, 50), dtype=np.uint8)  # H=30, W=50
    stored[4:10, 7:20] = 255  # the box (7, 4)-(20, 10)
    shown = oriented_pixels(stored, orientation)
    rows, columns = np.nonzero(shown)
    expected = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]

    corners = box_math.oriented(np.array([[7.0, 4.0, 20.0, 10.0]]), orientation, 50, 30)

    np.testing.assert_allclose(corners[0], expected)
    back = box_math.stored(corners, orientation, shown.shape[1], shown.shape[0])
    np.testing.assert_allclose(back[0], [7.0, 4.0, 20.0, 10.0])


def test_rescaled_maps_a_reduced_decode_back() -> None:
    boxes = box_math.as_array([(10.0, 20.0, 30.0, 40.0)])
    np.testing.assert_allclose(box_math.rescaled(boxes, 4.0), [[40.0, 80.0, 120.0, 160.0]])
    assert box_math.iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(1 / 3)


# --- helpers ------------------------------------------------------------------------------------


def jpeg(pixels: NDArray[np.uint8], orientation: int = 1) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def decoded(data: bytes) -> NDArray[np.uint8]:
    """What a viewer shows: decoded, EXIF orientation applied."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def assert_same_boxes(found: list[Box], expected: list[Box], tolerance: float) -> None:
    assert len(found) == len(expected), (found, expected)
    remaining = list(expected)
    for box in found:
        distances = [
            max(abs(a - b) for a, b in zip(box, other, strict=True)) for other in remaining
        ]
        closest = int(np.argmin(distances))
        assert distances[closest] <= tolerance, (box, remaining[closest])
        remaining.pop(closest)
