"""Calibrated confidences and per-class thresholds: which labels to believe.

A CNN's softmax is over-confident (Guo et al., "On Calibration of Modern Neural Networks", 2017):
the demo model said 1.000 for almost everything, a coffee cup included. Temperature scaling is
the method that paper recommends: one scalar T, fitted on the validation split by minimising the
negative log-likelihood (with a weak prior on log T, so that a split the model gets all right
cannot drive T to 0: `fit_temperature`), divides the logits; it never changes the argmax, so
accuracy is unchanged by construction. We only have the model's probabilities (an imported
model may end in a softmax or a sigmoid), so the logits are their logarithms: `softmax(log(p) /
T)` is the same as scaling the logits for a softmax head, and `sigmoid(logit(p) / T)` for a
sigmoid head (its two columns `[1 - p, p]`).

Per-class thresholds then say when a label is good enough: for each class, the lowest calibrated
confidence at which the validation images predicted as that class reach the target precision
(counting every image at or above it). A label below its class's threshold is `uncertain`. A
class the validation split never predicts, or never predicts precisely enough, gets no threshold
(null): every label of it is uncertain until a person has looked (better a review than a wrong
label passed as sure).

Expected calibration error (ECE) is measured with equal-width confidence bins on the top label.
Pure NumPy/SciPy; nothing here loads a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar

from training.metadata import Calibration

ECE_BINS = 15
# The prior's spread in log T (a factor of e either way): see `fit_temperature`.
LOG_TEMPERATURE_PRIOR_SD = 1.0
# Temperatures outside this range mean a broken fit, not a calibrated model.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
_TINY = 1e-12


def _log(scores: NDArray[np.floating]) -> NDArray[np.float64]:
    return np.log(np.clip(np.asarray(scores, dtype=np.float64), _TINY, 1.0))


def apply_temperature(scores: NDArray[np.floating], temperature: float) -> NDArray[np.float32]:
    """(N, C) class probabilities -> the same, sharpened (T < 1) or softened (T > 1)."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    logits = _log(scores) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exponentials = np.exp(logits)
    calibrated: NDArray[np.float32] = (
        exponentials / exponentials.sum(axis=1, keepdims=True)
    ).astype(np.float32)
    return calibrated


def negative_log_likelihood(scores: NDArray[np.floating], labels: NDArray[np.integer]) -> float:
    """Mean -log p(true class)."""
    picked = np.asarray(scores, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, _TINY, 1.0))))


def fit_temperature(scores: NDArray[np.floating], labels: NDArray[np.integer]) -> float:
    """The temperature of highest posterior: the negative log-likelihood of `labels` plus a
    weak prior, log T ~ N(0, `LOG_TEMPERATURE_PRIOR_SD`^2), worth one image.

    Why the prior: on a validation split the model gets (almost) all right, the likelihood keeps
    falling as T -> 0, and the plain fit sharpens every confidence towards 1.000, mistakes
    included (generated faces, 480 validation images, 2 wrong: T 0.089, and the test split's
    NLL rose 0.028 -> 0.067). The prior only decides where the data do not (T 0.28 there, test
    NLL 0.027 and ECE 0.0156 -> 0.0058); with a few mistakes in the split the likelihood
    dominates and the fit is the plain one to within a percent (the digits: T 1.38 -> 1.37).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no labelled scores to fit a temperature on")
    prior_weight = 1.0 / (2.0 * LOG_TEMPERATURE_PRIOR_SD**2 * len(labels))

    def loss(log_temperature: float) -> float:
        likelihood = negative_log_likelihood(
            apply_temperature(scores, math.exp(log_temperature)), labels
        )
        return likelihood + prior_weight * log_temperature**2

    # One bounded scalar search in log T: the NLL is smooth and unimodal enough in practice.
    found = minimize_scalar(
        loss,
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(found.x))


def expected_calibration_error(
    scores: NDArray[np.floating], labels: NDArray[np.integer], bins: int = ECE_BINS
) -> float:
    """Sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 0.0
    confidence = scores.max(axis=1)
    correct = (scores.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes in the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    error = 0.0
    for bin_index in range(bins):
        members = index == bin_index
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            error += members.mean() * gap
    return float(error)


def ece_noise_floor(
    scores: NDArray[np.floating], draws: int = 200, seed: int = 0, bins: int = ECE_BINS
) -> float:
    """The ECE that a perfectly calibrated model with exactly these top-label confidences would
    show on this many images: the mean over `draws` of ECE with each image's correctness drawn
    with probability equal to its confidence (seeded, so reports repeat).

    Binned ECE is biased upwards on small sets, the more so the more the confidences spread over
    sparsely filled bins (what a temperature above 1 does). An ECE at or below its floor is all
    that a set this size can resolve: 179 images at 97% accuracy have a floor of ~0.015.
    """
    confidence = np.asarray(scores, dtype=np.float64).max(axis=1)
    count = len(confidence)
    if count == 0 or draws < 1:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    members = [index == bin_index for bin_index in range(bins)]
    filled = [(mask, float(confidence[mask].mean()), mask.mean()) for mask in members if mask.any()]
    rng = np.random.default_rng(seed)
    total = 0.0
    # Draws in blocks, so a large set never holds more than ~4M booleans at once.
    block = max(1, min(draws, 4_000_000 // count))
    for start in range(0, draws, block):
        correct = rng.random((min(block, draws - start), count)) < confidence
        for mask, mean_confidence, weight in filled:
            total += float((weight * np.abs(correct[:, mask].mean(axis=1) - mean_confidence)).sum())
    return total / draws


def reliability(
    scores: NDArray[np.floating], labels: NDArray[np.integer], bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per non-empty bin: its range, mean confidence, accuracy and count (the diagram's data)."""
    scores = np.asarray(scores, dtype=np.float64)
    confidence = scores.max(axis=1)
    correct = scores.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for bin_index in range(bins):
        members = index == bin_index
        if members.any():
            rows.append(
                {
                    "low": float(edges[bin_index]),
                    "high": float(edges[bin_index + 1]),
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                    "count": int(members.sum()),
                }
            )
    return rows


def class_thresholds(
    scores: NDArray[np.floating],
    labels: NDArray[np.integer],
    class_names: Sequence[str],
    target_precision: float,
) -> dict[str, float | None]:
    """Per class, the lowest confidence from which its predictions reach `target_precision`.

    Among the images predicted as the class, sorted by confidence from the top, precision is
    counted over every image at or above each candidate; the lowest candidate that meets the
    target is the threshold. None meets it (or none is predicted): None, always uncertain.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = scores.argmax(axis=1)
    confidence = scores.max(axis=1)
    thresholds: dict[str, float | None] = {}
    for index, name in enumerate(class_names):
        members = predicted == index
        threshold: float | None = None
        if members.any():
            order = np.argsort(-confidence[members], kind="stable")
            sorted_confidence = confidence[members][order]
            hits = (labels[members][order] == index).astype(np.float64)
            precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
            # Ties: a candidate counts only where the next confidence is lower, so every image
            # at or above the threshold is in the count.
            last_of_tie = np.append(sorted_confidence[1:] < sorted_confidence[:-1], True)
            meets = np.flatnonzero((precision >= target_precision) & last_of_tie)
            if len(meets):
                threshold = float(sorted_confidence[meets[-1]])
        # Rounded down, so the image that set the threshold is never below it.
        thresholds[name] = None if threshold is None else math.floor(threshold * 1e6) / 1e6
    return thresholds


def fit_calibration(
    scores: NDArray[np.floating],
    labels: NDArray[np.integer],
    class_names: Sequence[str],
    target_precision: float,
    fitted_on: str,
) -> Calibration:
    """Fit the temperature and the thresholds on raw (uncalibrated) scores of a labelled set."""
    labels = np.asarray(labels, dtype=np.int64)
    temperature = fit_temperature(scores, labels)
    calibrated = apply_temperature(scores, temperature)
    return Calibration(
        temperature=round(temperature, 6),
        fitted_on=fitted_on,
        samples=len(labels),
        target_precision=target_precision,
        thresholds=class_thresholds(calibrated, labels, class_names, target_precision),
        ece_before=round(expected_calibration_error(scores, labels), 6),
        ece_after=round(expected_calibration_error(calibrated, labels), 6),
    )


def calibrate_scores(
    scores: NDArray[np.floating], calibration: Calibration | None
) -> NDArray[np.float32]:
    """Raw class scores -> calibrated ones (unchanged for a model without a calibration)."""
    if calibration is None:
        return np.asarray(scores, dtype=np.float32)
    return apply_temperature(scores, calibration.temperature)


def is_uncertain(
    label: str, confidence: float, thresholds: Mapping[str, float | None] | None
) -> bool:
    """Below its class's threshold (or its class has none): a label a person should look at.

    A model without thresholds (not calibrated) never says uncertain.
    """
    if thresholds is None:
        return False
    threshold = thresholds.get(label)
    return threshold is None or confidence < threshold


__all__ = [
    "ECE_BINS",
    "apply_temperature",
    "calibrate_scores",
    "class_thresholds",
    "ece_noise_floor",
    "expected_calibration_error",
    "fit_calibration",
    "fit_temperature",
    "is_uncertain",
    "negative_log_likelihood",
    "reliability",
]
