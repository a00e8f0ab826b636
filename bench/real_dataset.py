"""Train on a real N-class dataset that no code here generated, next to simple baselines.

The data: scikit-learn's bundled copy of the UCI handwritten digits (1,797 real 8x8 scans by 43
people, 10 classes; it ships inside the scikit-learn wheel, so nothing is downloaded). They are
written as a folder-per-class PNG tree and trained with the same `emolabel train` command as the
faces. Baselines use the SAME test split (read from the artifact's manifest): the majority class,
and a logistic regression on raw pixels.

    python -m bench.real_dataset --out runs/digits [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from training.dataset import read_manifest


def export_digits(root: Path) -> int:
    """Write every digit as an 8-bit grey PNG under root/<digit name>/."""
    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for index, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / names[int(target)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        cv2.imwrite(str(folder / f"digit_{index:04d}.png"), pixels)
    return len(digits.images)


def flat_pixels(paths: list[Path]) -> np.ndarray:
    """Each (written by this script, so readable) image as one row of pixels in [0, 1]."""
    rows = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise OSError(f"cannot read {path}")
        rows.append(image.reshape(-1) / 255.0)
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Mirroring changes what a digit is, so the default here is off.",
    )
    arguments = parser.parse_args()
    data = arguments.out / "data"
    models = arguments.out / "models"
    count = export_digits(data)
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "emolabel", "train", str(data), "--epochs", str(arguments.epochs),
        "--image-size", str(arguments.image_size), "--color", "grayscale",
        "--models-dir", str(models), "--name", "digits",
        "--augment" if arguments.augment else "--no-augment",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    artifact = sorted(p for p in (models / "digits").iterdir() if not p.name.startswith("."))[-1]
    metadata = json.loads((artifact / "metadata.json").read_text())
    split = read_manifest(artifact / "split_manifest.json", data)
    train_paths = [example.path for example in split.train]
    train_labels = [example.label for example in split.train]
    test_paths = [example.path for example in split.test]
    test_labels = [example.label for example in split.test]
    majority = max(set(train_labels), key=train_labels.count)
    majority_accuracy = float(np.mean(np.asarray(test_labels) == majority))
    logistic = LogisticRegression(max_iter=2000).fit(flat_pixels(train_paths), train_labels)
    logistic_accuracy = float(logistic.score(flat_pixels(test_paths), test_labels))
    result = {
        "dataset": "UCI handwritten digits (scikit-learn bundled copy)",
        "images": count,
        "classes": len(metadata["class_names"]),
        "test_images": len(test_paths),
        "cnn_test_accuracy": metadata["metrics"]["test"]["accuracy"],
        "cnn_macro_f1": metadata["metrics"]["test"]["macro"]["f1"],
        "baseline_majority_accuracy": majority_accuracy,
        "baseline_logistic_regression_accuracy": logistic_accuracy,
        "epochs_run": metadata["training"]["epochs_run"],
        "image_size": arguments.image_size,
        "augment": arguments.augment,
        "train_wall_seconds": round(wall, 1),
        "artifact": str(artifact),
    }
    (arguments.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
