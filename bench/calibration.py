"""`python -m bench calibration`: does the shipped calibration lower the test split's expected
calibration error, over several seeded training runs, and can a split that size show it at all?

For each seed it trains with the real command line (`emolabel train`, which fits the temperature
and thresholds on the validation split and stores them in the artifact), then scores the
artifact's own validation and test splits (read from its manifest) and reports on the test split:

- ECE (15 equal-width bins, `training/calibration.py`) and NLL of the raw scores and of the
  artifact's calibrated ones, and the accuracy (a temperature cannot change it);
- the **noise floor** (`training.calibration.ece_noise_floor`, which `train` and `evaluate`
  print too): the ECE that a perfectly calibrated model with exactly these confidences would
  show on this many images (`--floor-draws` draws). A measured ECE at or below its floor is all
  that a split of this size can resolve; binned ECE is biased upwards, the more so the more the
  confidences spread over sparsely filled bins, which is what softening (a temperature above 1)
  does;
- for comparison only, other ways to fit the same one temperature on the same validation split:
  the top label's Brier score and the ECE itself (grid searches in log T).

Datasets: `digits` (scikit-learn's bundled UCI digits, 10 real classes, as `bench.real_dataset`
writes them) and `faces` (`emolabel sample-data`, generated faces). Everything lives under
`--out`; nothing is asserted: it prints a table and writes `calibration.json`.

    python -m bench calibration --dataset digits --seeds 1,2,3,4,5
    python -m bench calibration --dataset faces --seeds 1,2,3 --per-class 400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench.real_dataset import export_digits
from core.settings import LimitSettings
from training.artifacts import load_artifact
from training.calibration import (
    apply_temperature,
    ece_noise_floor,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from training.dataset import read_manifest
from training.recalibrate import raw_scores

FACE_CLASSES = "angry,fear,happy,neutral,sad,surprise"
Scores = NDArray[np.float32]
Labels = NDArray[np.int64]
GRID = np.exp(np.linspace(math.log(0.05), math.log(20.0), 801))


def top_label_brier(scores: Scores, labels: Labels) -> float:
    """Mean squared gap between the top label's confidence and whether it is right."""
    correct = scores.argmax(axis=1) == labels
    return float(np.mean((scores.max(axis=1) - correct) ** 2))


def grid_fit(objective: Callable[[Scores, Labels], float]) -> Callable[[Scores, Labels], float]:
    def fit(scores: Scores, labels: Labels) -> float:
        losses = [objective(apply_temperature(scores, float(t)), labels) for t in GRID]
        return float(GRID[int(np.argmin(losses))])

    return fit


ALTERNATIVES: dict[str, Callable[[Scores, Labels], float]] = {
    "nll": fit_temperature,  # what training ships (refitted here: the same number)
    "top_label_brier": grid_fit(top_label_brier),
    "ece": grid_fit(expected_calibration_error),
}


def prepare_data(dataset: str, data: Path, per_class: int, environment: dict[str, str]) -> None:
    if data.exists():
        return
    if dataset == "digits":
        export_digits(data)
        return
    command = [
        sys.executable, "-m", "emolabel", "sample-data", str(data), "--classes", FACE_CLASSES,
        "--per-class", str(per_class), "--seed", "3",
    ]  # fmt: skip
    subprocess.run(command, check=True, env=environment)


def train(
    dataset: str, data: Path, models: Path, seed: int, epochs: int, environment: dict[str, str]
) -> Path:
    command = [
        sys.executable, "-m", "emolabel", "train", str(data), "--epochs", str(epochs),
        "--seed", str(seed), "--models-dir", str(models), "--name", dataset,
    ]  # fmt: skip
    if dataset == "digits":  # as bench.real_dataset trains them: mirroring changes a digit
        command += ["--image-size", "64", "--color", "grayscale", "--no-augment"]
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    return sorted(path for path in (models / dataset).iterdir() if path.name[0].isdigit())[-1]


def one_seed(
    dataset: str, data: Path, directory: Path, arguments: argparse.Namespace, seed: int
) -> dict[str, Any]:
    artifact = load_artifact(directory, directory.parent.parent, dataset)
    calibration = artifact.metadata.calibration
    if calibration is None:
        raise SystemExit(f"{directory}: training stored no calibration")
    split = read_manifest(directory / "split_manifest.json", data)
    limits = LimitSettings()
    parts = {}
    for part in ("validation", "test"):
        examples = getattr(split, part)
        scores, labels, _ = raw_scores(
            artifact, [e.path for e in examples], [e.label for e in examples], limits
        )
        parts[part] = (scores, labels)
    validation, (test, labels) = parts["validation"], parts["test"]
    calibrated = apply_temperature(test, calibration.temperature)
    floor_raw = ece_noise_floor(test, arguments.floor_draws, seed)
    floor_calibrated = ece_noise_floor(calibrated, arguments.floor_draws, seed)
    alternatives = {}
    for name, fit in ALTERNATIVES.items():
        temperature = fit(*validation)
        scaled = apply_temperature(test, temperature)
        alternatives[name] = {
            "temperature": round(temperature, 4),
            "test_ece": round(expected_calibration_error(scaled, labels), 4),
            "test_nll": round(negative_log_likelihood(scaled, labels), 4),
        }
    return {
        "seed": seed,
        "artifact": str(directory),
        "test_images": len(labels),
        "validation_images": len(validation[1]),
        "temperature": calibration.temperature,
        "accuracy_raw": round(float(np.mean(test.argmax(axis=1) == labels)), 4),
        "accuracy_calibrated": round(float(np.mean(calibrated.argmax(axis=1) == labels)), 4),
        "validation_ece": [calibration.ece_before, calibration.ece_after],
        "test_ece": [
            round(expected_calibration_error(test, labels), 4),
            round(expected_calibration_error(calibrated, labels), 4),
        ],
        "test_nll": [
            round(negative_log_likelihood(test, labels), 4),
            round(negative_log_likelihood(calibrated, labels), 4),
        ],
        "test_ece_floor": [round(floor_raw, 4), round(floor_calibrated, 4)],
        "alternatives": alternatives,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, index: int) -> float:
        return round(float(np.mean([row[key][index] for row in rows])), 4)

    return {
        "seeds": len(rows),
        "mean_test_ece": [mean("test_ece", 0), mean("test_ece", 1)],
        "mean_test_nll": [mean("test_nll", 0), mean("test_nll", 1)],
        "mean_test_ece_floor": [mean("test_ece_floor", 0), mean("test_ece_floor", 1)],
        # ECE less its floor: what the confidences miss beyond what the split's size explains.
        "mean_test_ece_above_floor": [
            round(
                float(np.mean([row["test_ece"][i] - row["test_ece_floor"][i] for row in rows])), 4
            )
            for i in (0, 1)
        ],
        "ece_fell": sum(row["test_ece"][1] < row["test_ece"][0] for row in rows),
        "nll_fell": sum(row["test_nll"][1] < row["test_nll"][0] for row in rows),
        "alternatives_mean_test_ece": {
            name: round(float(np.mean([row["alternatives"][name]["test_ece"] for row in rows])), 4)
            for name in ALTERNATIVES
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench calibration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=("digits", "faces"), default="digits")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="training seeds, comma-separated")
    parser.add_argument("--epochs", type=int, help="default: 30 for digits, 20 for faces")
    parser.add_argument("--per-class", type=int, default=400, help="faces per class")
    parser.add_argument("--floor-draws", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/calibration"))
    arguments = parser.parse_args()
    seeds = [int(seed) for seed in arguments.seeds.split(",") if seed.strip()]
    epochs = arguments.epochs or (30 if arguments.dataset == "digits" else 20)
    out: Path = arguments.out.resolve() / arguments.dataset
    out.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    data = out / "data"
    prepare_data(arguments.dataset, data, arguments.per_class, environment)
    rows = []
    started = time.perf_counter()
    for seed in seeds:
        directory = train(
            arguments.dataset, data, out / f"models-{seed}", seed, epochs, environment
        )
        row = one_seed(arguments.dataset, data, directory, arguments, seed)
        rows.append(row)
        print(
            f"seed {seed}: T {row['temperature']:.3f}, accuracy {row['accuracy_raw']:.4f} "
            f"(calibrated {row['accuracy_calibrated']:.4f}), test ECE {row['test_ece'][0]:.4f} -> "
            f"{row['test_ece'][1]:.4f} (floor {row['test_ece_floor'][0]:.4f} -> "
            f"{row['test_ece_floor'][1]:.4f}), test NLL {row['test_nll'][0]:.4f} -> "
            f"{row['test_nll'][1]:.4f}, {row['test_images']} test images",
            flush=True,
        )
    report = {
        "dataset": arguments.dataset,
        "epochs": epochs,
        "per_class": arguments.per_class if arguments.dataset == "faces" else None,
        "runs": rows,
        "summary": summary(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
