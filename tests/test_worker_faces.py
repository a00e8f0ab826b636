"""The worker's face path (`worker.predict.label_face_images`) on real photos and the real detector.

A fixed-score runner stands in for the classifier, so what is checked is the path: faces found on
each photo as `find_faces` finds them, every face's crop sent to the model in shared batches of at
most `batch_size`, results back to their photo, `no_face` for a photo without a face, a broken file
failed with its reason, one outcome per URI in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from numpy.typing import NDArray

from core.reasons import Reason
from core.settings import FaceSettings, LimitSettings
from tests.support.photos import photo_file
from training.faces import detector_config
from training.faces.labeling import find_faces
from training.faces.mtcnn import MtcnnDetector, load_mtcnn
from training.preprocess import InputSpec
from worker.predict import StageTimes, label_face_images

FACES = FaceSettings()
LIMITS = LimitSettings()


class CountingRunner:
    """Scores every face 'happy' 0.75; remembers the size of each batch it was given."""

    version = "fixed"
    spec = InputSpec(64, 64, "grayscale", 2 / 255, -1.0)
    class_names: Sequence[str] = ("happy", "sad")
    thresholds = None

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        assert images.dtype == np.uint8 and images.shape[1:] == self.spec.shape
        self.batches.append(len(images))
        return np.tile(np.array([[0.75, 0.25]], np.float32), (len(images), 1))


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return load_mtcnn(detector_config(FACES))


@pytest.fixture(scope="module")
def lfw_group() -> bytes:
    """Four real LFW faces pasted into scikit-learn's china.jpg (a photo with no person)."""
    import cv2
    from skimage import data

    scene = cv2.cvtColor(cv2.imread(str(photo_file("china.jpg"))), cv2.COLOR_BGR2RGB)
    faces = data.lfw_subset()[:4]
    for slot, face in enumerate(faces):
        tile = cv2.resize((face * 255).astype(np.uint8), (120, 120))
        x, y = 40 + slot * 150, 60 + (slot % 2) * 160
        scene[y : y + 120, x : x + 120] = tile[:, :, None]
    return bytes(cv2.imencode(".png", cv2.cvtColor(scene, cv2.COLOR_RGB2BGR))[1])


def test_faces_are_labeled_in_shared_batches_and_no_face_is_an_outcome(
    detector: MtcnnDetector, lfw_group: bytes
) -> None:
    files = {
        "mem://astronaut": photo_file("astronaut.png").read_bytes(),
        "mem://coffee": photo_file("coffee.png").read_bytes(),
        "mem://broken": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "mem://group": lfw_group,
        "mem://chelsea": photo_file("chelsea.png").read_bytes(),
    }
    runner = CountingRunner()
    times = StageTimes()
    with ThreadPoolExecutor(2) as pool:
        outcomes = label_face_images(
            list(files),
            read=files.__getitem__,
            runner=runner,
            detector=detector,
            faces=FACES,
            limits=LIMITS,
            pool=pool,
            batch_size=3,
            times=times,
            photos_ahead=2,
        )

    assert [outcome.uri for outcome in outcomes] == list(files)
    by_uri = {outcome.uri: outcome for outcome in outcomes}
    broken = by_uri["mem://broken"]
    assert broken.failed and broken.reason in {r.value for r in Reason} and broken.faces is None
    for name in ("mem://coffee", "mem://chelsea"):
        result = by_uri[name].faces
        assert result is not None and result.outcome == "no_face" and not by_uri[name].failed
    astronaut, group = by_uri["mem://astronaut"].faces, by_uri["mem://group"].faces
    assert astronaut is not None and group is not None
    assert len(astronaut.faces) == 1 and len(group.faces) == 4
    # The worker finds what the shared function finds, box for box.
    for uri, result in (("mem://astronaut", astronaut), ("mem://group", group)):
        expected = find_faces(files[uri], detector, runner.spec, FACES, LIMITS)
        assert len(expected.faces) == len(result.faces)
        assert all(face.label == "happy" and face.confidence == 0.75 for face in result.faces)
        assert [face.index for face in result.faces] == list(range(len(result.faces)))
    # Five faces in batches of at most three: the astronaut's face waited for the group's.
    assert sum(runner.batches) == 5 and max(runner.batches) <= 3
    assert times.decode > 0 and times.predict > 0
