"""The report: the environment, the ratios of (d) to the other phases, the median round, and
the table printed at the end of a run.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from bench.machine import describe, machine, package_versions


def environment(*, tensorflow: str) -> dict[str, Any]:
    """Versions, cores and memory: what the numbers depend on (TensorFlow's from the child)."""
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "tensorflow": tensorflow,
    }
    # simplejpeg: (b) and (d) decode plain JPEGs through it.
    packages = ("keras", "tensorflow-cpu", "opencv-python-headless", "simplejpeg", "pillow")
    installed = package_versions((*packages, "celery", "redis", "sqlalchemy"))
    versions.update({name: version for name, version in installed.items() if version})
    return {**machine(), "versions": versions}


def ratios(phases: dict[str, Any]) -> dict[str, float | None]:
    """(d) over (b), (c) and (a), from images/s, and over the shared-core bound of (b) and (c).

    Decoding and the model each use every core, so one pipeline doing both cannot beat
    1 / (1/b + 1/c) images/s: that is what perfect overlap on the same cores would give.
    """
    end_to_end_rate = phases["emolabel"]["images_per_s"]

    def over(name: str) -> float | None:
        rate = phases[name]["images_per_s"]
        return round(end_to_end_rate / rate, 3) if rate else None

    decode_rate, model_rate = phases["decode"]["images_per_s"], phases["model"]["images_per_s"]
    # The faster of the two model-alone figures is the model's limit on these cores.
    model_rate = max(model_rate, phases.get("model_layout", {}).get("images_per_s", 0.0))
    bound = 1 / (1 / decode_rate + 1 / model_rate) if decode_rate and model_rate else None
    return {
        "d_over_b": over("decode"),
        "d_over_c": over("model"),
        "d_over_c_layout": over("model_layout") if "model_layout" in phases else None,
        "d_over_a": over("notebook"),
        "shared_core_bound_images_per_s": None if bound is None else round(bound, 2),
        "d_over_shared_core_bound": None if bound is None else round(end_to_end_rate / bound, 3),
    }


PHASE_LABELS = {
    "notebook": "(a) notebook loop",
    "decode": "(b) decode floor",
    "model": "(c) model alone",
    "model_layout": "(c') model, layout",
    "emolabel": "(d) emolabel e2e",
}


def print_table(report: dict[str, Any]) -> None:
    """One row per set and phase, the ratios, and the worker's memory."""
    header = (
        f"{'set':<20}{'phase':<20}{'images':>7}{'s':>9}{'images/s':>10}{'cpu s':>8}"
        f"{'cpu ms/img':>11}  {'load':<12}note"
    )
    print(header)
    print("-" * (len(header) + 20))
    for name, result in report["sets"].items():
        for phase in ("notebook", "decode", "model", "model_layout", "emolabel"):
            if phase not in result["phases"]:
                continue
            row = result["phases"][phase]
            cpu = row.get("cpu_seconds", row.get("worker_cpu_seconds"))
            per_image = row.get("cpu_ms_per_image")
            print(
                f"{name:<20}{PHASE_LABELS[phase]:<20}{row['images']:>7}"
                f"{row.get('seconds', 0.0):>9.2f}{row['images_per_s']:>10.1f}"
                f"{'-' if cpu is None else f'{cpu:.1f}':>8}"
                f"{'-' if per_image is None else f'{per_image:.2f}':>11}"
                f"  {_load_text(row):<12}{_note(phase, row)}{_spread(row)}"
            )
    print()
    for name, result in report["sets"].items():
        ratio = result["ratios"]
        print(
            f"{name}: (d)/(b) {_ratio(ratio['d_over_b'])}  (d)/(c) {_ratio(ratio['d_over_c'])}"
            f"  (d)/(c') {_ratio(ratio.get('d_over_c_layout'))}"
            f"  (d)/(a) {_ratio(ratio['d_over_a'])}   (d) / shared-core bound 1/(1/b+1/max(c,c'))"
            f" {ratio['shared_core_bound_images_per_s']} img/s:"
            f" {_ratio(ratio['d_over_shared_core_bound'])}"
        )
        by_round = result.get("by_round") or []
        if len(by_round) > 1:
            print(
                f"{name}: by round (each round's own (d) over its own (b), (c), (c'), (a)):"
                + "".join(
                    f"  {index}: (d)/(b) {_ratio(r['d_over_b'])} (d)/(c) {_ratio(r['d_over_c'])}"
                    f" (d)/(c') {_ratio(r['d_over_c_layout'])} (d)/(a) {_ratio(r['d_over_a'])}"
                    for index, r in enumerate(by_round, start=1)
                )
            )
    print()
    for name, result in report["sets"].items():
        e2e = result["phases"]["emolabel"]
        memory = e2e["memory"]
        marks = ", ".join(
            f"{point['percent']}%: {point['rss_mib']:.0f}" for point in memory["checkpoints"]
        )
        pool = "+".join(f"{value:.0f}" for value in memory["pool_vm_hwm_mib"]) or "-"
        stages = e2e.get("worker_stages") or {}
        stage_text = ", ".join(
            f"{stage} {stages[stage]}"
            for stage in (
                "task_seconds",
                "decode",
                "predict",
                "waiting_for_decode",
                "write",
                "outside_tasks_seconds",
            )
            if stage in stages
        )
        print(
            f"{name}: worker VmHWM main {memory['main_vm_hwm_mib']:.0f} MiB + pool {pool} MiB;"
            f" RSS (MiB) {marks}; worker CPU {e2e['worker_cpu_seconds']} s,"
            f" chunks (s): {stage_text or '-'}"
        )
        machine = e2e.get("machine_cpu_seconds")
        if machine:
            parts = ", ".join(
                f"{key} {value}"
                for key, value in machine.items()
                if key not in {"cpu_seconds_available", "busy"}
            )
            idle = e2e.get("machine_idle_share") or {}
            shares = ", ".join(f"{part} {share}" for part, share in idle.items())
            print(
                f"{name}: machine CPU s during (d): {machine['cpu_seconds_available']} available,"
                f" {machine['busy']} busy; {parts}; idle share by part of the span: {shares}"
            )
        busiest = e2e.get("worker_cpu_by_thread", [])[:8]
        if busiest:
            print(
                f"{name}: worker CPU s by thread, busiest first: "
                + ", ".join(f"{thread['name']} {thread['cpu_seconds']}" for thread in busiest)
            )
    idle = report.get("end_to_end", {}).get("idle_worker_cpu_by_round") or []
    if idle:
        print(
            "the idle worker's CPU s during (a)-(c') by round: "
            + ", ".join(f"{row['worker_cpu_seconds']} in {row['seconds']} s" for row in idle)
        )
    env = report["environment"]
    print(
        f"\n{describe(env)}; load {report['load_before']} before, "
        f"{report['load_after']} after; {report['sets_note']}"
    )


def _load_text(row: dict[str, Any]) -> str:
    """The 1-minute load average before → after (all three are in the JSON)."""
    before, after = row.get("load_before") or ["-"], row.get("load_after") or ["-"]
    return f"{before[0]}→{after[0]}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _spread(row: dict[str, Any]) -> str:
    repeats = row.get("repeats") or []
    if len(repeats) < 2:
        return ""
    rates = sorted(repeat["images_per_s"] for repeat in repeats)
    return f"; median of {len(rates)}: {rates[0]:.1f}-{rates[-1]:.1f}"


def _note(phase: str, row: dict[str, Any]) -> str:
    if phase == "notebook":
        return "subset: the first images only"
    if phase == "decode":
        return f"{row['threads']} threads, {row['failed']} failed"
    if phase == "model":
        return f"{row['batches']} batches of {row['batch_size']}, {row.get('precision', '')}"
    if phase == "model_layout":
        return f"{row['processes']} processes x {row['threads']} threads, at once"
    return f"{row['chunks']} chunks, {row['failed']} failed; scan {row['scan_seconds']} s"


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s (the lower middle one of an even count), whole.

    A whole run rather than per-field medians, so that its seconds, CPU and memory belong
    together; `repeats` lists every round's images/s and CPU ms per image beside it.
    """
    by_rate = sorted(range(len(runs)), key=lambda index: runs[index]["images_per_s"])
    middle = by_rate[(len(runs) - 1) // 2]
    chosen = dict(runs[middle])
    chosen["round"] = middle + 1
    chosen["repeats"] = [
        {
            "round": index + 1,
            "images_per_s": run["images_per_s"],
            "cpu_ms_per_image": run.get("cpu_ms_per_image"),
            "seconds": run.get("seconds"),
        }
        for index, run in enumerate(runs)
    ]
    return chosen
