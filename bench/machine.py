"""What a benchmark's numbers depend on besides the code: the CPU, cores, memory and commit.

Figures from two hosts are not comparable: the same 2 vCPUs were an Intel Xeon with AMX in one
session and an AMD EPYC in another, and the model's share of a photo's CPU moved by a third
between them. So every report names the CPU and the instruction sets the model's kernels use.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent

# The instruction sets that decide how fast oneDNN's convolutions and libjpeg-turbo's SIMD run.
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description(cpuinfo: str) -> dict[str, Any]:
    """The first processor's model name and which of `FEATURES` it has, from /proc/cpuinfo."""
    model: str | None = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model is not None and flags:
            break
    return {"cpu_model": model, "cpu_features": [name for name in FEATURES if name in flags]}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    """Platform, CPU, cores (all and usable by this process), memory and the commit measured."""
    return {
        "platform": platform.platform(),
        **cpu_description(_cpuinfo()),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "commit": commit(),
    }


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each distribution (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def commit() -> str | None:
    """The short hash of HEAD, with "+dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPOSITORY, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPOSITORY, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def describe(report: dict[str, Any]) -> str:
    """ "2 cores of AMD EPYC (avx2, fma, ...)": the line a printed table ends with."""
    features = ", ".join(report.get("cpu_features") or ["no AVX2, AVX-512 or AMX"])
    cpu = report.get("cpu_model") or "an unnamed CPU"
    cores = report["cpus_usable"]
    return f"{cores} core{'' if cores == 1 else 's'} of {cpu} ({features})"
