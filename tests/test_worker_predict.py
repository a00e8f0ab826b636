"""label_images on real files and the real tiny model: order kept, bad images become reasons."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from emolabel.settings import LimitSettings
from training.train import TrainOutcome
from worker.model_runner import KerasRunner
from worker.predict import StageTimes, label_images

pytestmark = pytest.mark.slow


def test_outcomes_in_order_with_reasons(
    tiny_model: TrainOutcome, sample_dir: Path, tmp_path: Path
) -> None:
    good = sorted((sample_dir / "happy").iterdir())[:5] + sorted((sample_dir / "sad").iterdir())[:5]
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    uris = [str(path) for path in good[:3]] + [str(tmp_path / "text.jpg")]
    uris += [str(path) for path in good[3:]] + [str(tmp_path / "empty.png")]

    def read(uri: str) -> bytes:
        return Path(uri).read_bytes()

    runner = KerasRunner.from_path(tiny_model.artifact_dir, 4)
    times = StageTimes()
    with ThreadPoolExecutor(2) as pool:
        outcomes = label_images(
            uris, read=read, runner=runner, limits=LimitSettings(), pool=pool, batch_size=4,
            times=times, read_ahead=3,
        )  # fmt: skip
    assert [outcome.uri for outcome in outcomes] == uris
    assert outcomes[3].reason == "not_an_image" and outcomes[3].prediction is None
    assert outcomes[-1].reason == "empty"
    labeled = [outcome for outcome in outcomes if outcome.prediction is not None]
    assert len(labeled) == 10
    assert all(outcome.prediction.label in {"happy", "sad"} for outcome in labeled)  # type: ignore[union-attr]
    assert times.predict > 0 and times.decode > 0
