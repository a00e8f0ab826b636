"""bench.calibration's own arithmetic: the top label's Brier score."""

from __future__ import annotations

import numpy as np

from bench.calibration import top_label_brier


def test_top_label_brier_reads_the_top_label_only() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    labels = np.array([0, 0, 0])
    # right at 0.9, wrong at 0.8, right at 0.6
    expected = ((0.9 - 1) ** 2 + (0.8 - 0) ** 2 + (0.6 - 1) ** 2) / 3
    assert abs(top_label_brier(scores, labels) - expected) < 1e-6
