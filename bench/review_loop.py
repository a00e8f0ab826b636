"""`python -m bench review_loop`: the whole review loop on generated faces, through the real
command line, and what it did to the corrected images.

1. a deliberately weak model: `train` on a small generated set for a few epochs;
2. `label` a separate generated archive (embedded Redis, a local worker, SQLite);
3. a reviewer corrects every label that disagrees with the folder's class (the verdicts go in
   through `db.repository.record_reviews`, what the review page calls);
4. `retrain` on the same training folder: the run trains on it plus the reviewed images;
5. when the challenger is promoted, `label --where older-model` relabels the archive, and the
   report says how many corrected images the promoted model now labels as the reviewer said
   (and the archive accuracy before and after); when it is not, the run's reason.

Everything lives under `--out` (home, models, data); the services the run started are stopped at
the end. Nothing here is asserted: it measures, prints, and writes `review-loop.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.settings import Settings
from core.uris import uri_to_path
from db.models import Image, JobItem, Result, RetrainRun
from db.repository import ReviewInput, record_reviews
from db.session import make_engine, make_sessionmaker

CLASSES = ("happy", "sad")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench review_loop", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/review-loop"))
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--archive-per-class", type=int, default=150)
    parser.add_argument("--weak-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    out: Path = arguments.out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty: give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    # A short home: the embedded Redis's unix socket path must fit in 103 bytes.
    home = Path(f"/tmp/emolabel-loop-{os.getpid()}")
    environment = {
        **os.environ,
        "EMOLABEL_HOME": str(home),
        "EMOLABEL_MODELS_DIR": str(out / "models"),
        "EMOLABEL_DATABASE_URL": f"sqlite:///{out / 'ledger.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for name in ("EMOLABEL_BROKER_URL", "EMOLABEL_MODEL_NAME"):
        environment.pop(name, None)
    report: dict[str, Any] = {"arguments": {k: str(v) for k, v in vars(arguments).items()}}
    started = time.perf_counter()
    try:
        run(arguments, out, environment, report)
    finally:
        emolabel(environment, "services", "stop")
        report["seconds"] = round(time.perf_counter() - started, 1)
        (out / "review-loop.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    return 0


def run(
    arguments: argparse.Namespace, out: Path, environment: dict[str, str], report: dict[str, Any]
) -> None:
    classes = ",".join(CLASSES)
    train, archive = out / "train", out / "archive"
    emolabel(environment, "sample-data", str(train), "--classes", classes,
             "--per-class", str(arguments.train_per_class),
             "--seed", str(arguments.seed))  # fmt: skip
    emolabel(environment, "sample-data", str(archive), "--classes", classes,
             "--per-class", str(arguments.archive_per_class),
             "--seed", str(arguments.seed + 1))  # fmt: skip
    emolabel(environment, "db", "upgrade")
    emolabel(environment, "train", str(train), "--epochs", str(arguments.weak_epochs))
    emolabel(environment, "label", str(archive))

    settings = Settings(
        home=Path(environment["EMOLABEL_HOME"]),
        models_dir=Path(environment["EMOLABEL_MODELS_DIR"]),
        database_url=environment["EMOLABEL_DATABASE_URL"],
    )
    sessions = make_sessionmaker(make_engine(settings.effective_database_url))
    first = labels(sessions)
    report["weak_model"] = first["version"]
    report["archive_accuracy_before"] = first["accuracy"]
    wrong = {image_id: truth for image_id, (label, truth) in first["by_image"].items()
             if label != truth}  # fmt: skip
    report["corrected"] = len(wrong)
    with sessions.begin() as session:
        record_reviews(
            session=session,
            reviews=[
                ReviewInput(image_id=image_id, model_version=first["version"],
                            new_label=truth, reviewer="bench")
                for image_id, truth in sorted(wrong.items())
            ],
        )  # fmt: skip

    emolabel(environment, "retrain", str(train))
    with sessions() as session:
        last = session.scalars(select(RetrainRun).order_by(RetrainRun.id.desc()).limit(1)).one()
        report["retrain"] = {
            "decision": str(last.decision),
            "reason": last.reason,
            "reviewed_items": last.reviewed_items,
            "challenger": last.challenger_version,
        }
    if str(last.decision) != "promoted":
        return
    emolabel(environment, "label", str(archive), "--where", "older-model")
    second = labels(sessions, version=last.challenger_version)
    report["archive_accuracy_after"] = second["accuracy"]
    as_said = sum(second["by_image"].get(image_id, (None,))[0] == truth
                  for image_id, truth in wrong.items())  # fmt: skip
    report["corrected_labeled_as_the_reviewer_said"] = as_said
    # The corrected images trained the new model; the others are what it had not seen.
    unseen = [(label, truth) for image_id, (label, truth) in second["by_image"].items()
              if image_id not in wrong]  # fmt: skip
    report["unreviewed_images"] = len(unseen)
    report["unreviewed_accuracy_before"] = round(
        sum(first["by_image"][image_id][0] == first["by_image"][image_id][1]
            for image_id in second["by_image"] if image_id not in wrong)
        / max(len(unseen), 1), 4)  # fmt: skip
    report["unreviewed_accuracy_after"] = round(
        sum(label == truth for label, truth in unseen) / max(len(unseen), 1), 4
    )


def labels(sessions: Any, version: str | None = None) -> dict[str, Any]:
    """Each archive image's label by `version` (default: the first job's model) and its folder's
    class; the accuracy over them."""
    with sessions() as session:
        if version is None:
            version = session.scalars(select(Result.model_version).limit(1)).one()
        rows = session.execute(
            select(Image.id, Image.uri, Result.label)
            .join(Result, Result.image_id == Image.id)
            .join(JobItem, JobItem.image_id == Image.id)
            .where(Result.model_version == version)
            .distinct()
        ).all()
    by_image = {
        image_id: (label, Path(os.fsdecode(uri_to_path(uri))).parent.name)
        for image_id, uri, label in rows
    }
    right = sum(label == truth for label, truth in by_image.values())
    return {
        "version": version,
        "by_image": by_image,
        "accuracy": round(right / max(len(by_image), 1), 4),
    }


def emolabel(environment: dict[str, str], *arguments: str) -> None:
    print("$ emolabel " + " ".join(arguments), flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "emolabel", *arguments], env=environment, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"emolabel {' '.join(arguments)} exited with {done.returncode}")


if __name__ == "__main__":
    raise SystemExit(main())
