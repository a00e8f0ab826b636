"""float32 against bfloat16 serving, on a trained model and a labeled folder, in one run.

    python -m bench precision --model models/emotion/<version> --folder data/test
    python -m bench precision --model runs/digits/models/digits/<version> --folder runs/digits/data

Before setting `EMOLABEL_WORKER__PRECISION=bfloat16`, run this on your own model and a labeled
sample of your archive: it tells how many labels change and how fast each precision is here.
Both runners are the worker's own (`worker.model_runner.KerasRunner`, compiled, fixed batch
shapes) on the same decoded images, in this process with the framework's default threads.
Reports, per precision: accuracy against the folder classes, the model alone in images/s and CPU
ms per image (whole batches, one untimed call first); and between them: labels that differ,
and the largest and mean difference in the top confidence. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray


def _images(folder: Path, artifact: Any) -> tuple[NDArray[np.uint8], NDArray[np.int64], int]:
    """Every usable image of a folder-per-class set, decoded as the worker does, and its class."""
    from core.errors import DataError
    from core.settings import LimitSettings
    from training.clean import scan_dataset
    from training.dataset import discover_classes, examples_from_report
    from training.evaluate import load_labeled_images

    limits = LimitSettings()
    known = list(artifact.metadata.class_names)
    classes = discover_classes(folder)
    unknown = sorted(set(classes) - set(known))
    if unknown:
        raise SystemExit(f"error: {folder} has classes the model does not know: {unknown}")
    examples, _ = examples_from_report(scan_dataset(folder, limits), classes)
    try:
        images, labels, unusable = load_labeled_images(
            artifact,
            [example.path for example in examples],
            [known.index(example.class_name) for example in examples],
            limits,
        )
    except DataError:
        raise SystemExit(f"error: no usable image in {folder}") from None
    return images, np.asarray(labels, dtype=np.int64), len(unusable)


def _timed(runner: Any, images: NDArray[np.uint8], batch_size: int) -> dict[str, float]:
    whole = max(batch_size, (len(images) // batch_size) * batch_size)
    batch = np.resize(images, (whole, *images.shape[1:]))  # whole batches, repeated if few
    runner.predict(batch[:batch_size])  # traces the batch shape
    cpu, started = time.process_time(), time.perf_counter()
    runner.predict(batch)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return {
        "images": int(whole),
        "seconds": round(seconds, 3),
        "images_per_s": round(whole / seconds, 1),
        "cpu_ms_per_image": round(1000 * cpu_seconds / whole, 3),
    }


def compare(model_dir: Path, folder: Path, batch_size: int) -> dict[str, Any]:
    from training.runtime import load_keras
    from worker.resources import cpu_has_bfloat16

    keras = load_keras()
    from training.artifacts import load_artifact
    from worker.model_runner import KerasRunner

    artifact = load_artifact(model_dir, model_dir.parent.parent, model_dir.parent.name)
    images, truth, skipped = _images(folder, artifact)
    report: dict[str, Any] = {
        "benchmark": "precision",
        "model": str(model_dir),
        "folder": str(folder),
        "images": len(images),
        "skipped": skipped,
        "classes": list(artifact.metadata.class_names),
        "keras_backend": keras.backend.backend(),
        "cpu_has_bfloat16": cpu_has_bfloat16(),
        "precisions": {},
    }
    scores: dict[str, NDArray[np.float32]] = {}
    for precision in ("float32", "bfloat16"):
        runner = KerasRunner(artifact, batch_size, precision)
        scores[precision] = runner.predict(images)
        predicted = scores[precision].argmax(axis=1)
        report["precisions"][precision] = {
            "served": runner.precision,
            "accuracy": round(float((predicted == truth).mean()), 4),
            "model_alone": _timed(runner, images, batch_size),
        }
    exact, fast = scores["float32"], scores["bfloat16"]
    differ = exact.argmax(axis=1) != fast.argmax(axis=1)
    top = np.abs(exact.max(axis=1) - fast.max(axis=1))
    report["labels_differing"] = int(differ.sum())
    report["top_confidence_difference"] = {
        "max": round(float(top.max()), 5),
        "mean": round(float(top.mean()), 6),
        "p99": round(float(np.percentile(top, 99)), 5),
    }
    report["score_difference_max"] = round(float(np.abs(exact - fast).max()), 5)
    rates = [report["precisions"][name]["model_alone"]["images_per_s"] for name in scores]
    report["bfloat16_speedup"] = round(rates[1] / rates[0], 2)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, required=True, help="an artifact folder")
    parser.add_argument("--folder", type=Path, required=True, help="a folder-per-class set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-precision"))
    arguments = parser.parse_args(argv)
    report = compare(arguments.model.resolve(), arguments.folder.resolve(), arguments.batch_size)
    for name, row in report["precisions"].items():
        alone = row["model_alone"]
        print(
            f"{name:<9} served {row['served']:<9} accuracy {row['accuracy']:.4f}  model alone "
            f"{alone['images_per_s']:.1f} img/s, {alone['cpu_ms_per_image']:.2f} CPU ms/img"
        )
    top = report["top_confidence_difference"]
    print(
        f"{report['images']} images: {report['labels_differing']} labels differ; top confidence "
        f"differs by at most {top['max']} (mean {top['mean']}); bfloat16 "
        f"{report['bfloat16_speedup']}x (CPU has bfloat16 units: {report['cpu_has_bfloat16']})"
    )
    arguments.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    path = arguments.out / f"precision-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
