"""Find the files in a folder-per-class dataset that cannot be trained on, and set them aside.

`scan_dataset` judges every file by its content (never its extension) with the same `preprocess`
functions that training and serving use, so a file it passes is a file training can load.
`quarantine` moves refused files out of the dataset; nothing here ever deletes a user's file.

Every entry scanned ends in exactly one place: `report.scanned == len(report.good) +
len(report.findings)`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError, ImageError
from core.reasons import Reason
from core.settings import LimitSettings
from core.storage.local import describe, file_kind, read_file
from core.storage.walk import Refused, walk_tree
from training import preprocess

logger = logging.getLogger(__name__)

# Never scanned, wherever it appears: a quarantine folder that ended up inside a dataset would
# otherwise be rescanned and its refused files reported (or trained on) again.
QUARANTINE_FOLDER_NAME = ".emolabel_quarantine"

# Decoding at a small size still runs the whole entropy decoder, which is what proves a file intact;
# large JPEGs are decoded at reduced scale, exactly as training does.
_CHECK_SPEC = preprocess.InputSpec(height=64, width=64, color_mode="rgb")


@dataclass(frozen=True)
class Finding:
    """One entry that cannot be used, and why.

    `duplicate_of` names the first file (in sorted path order) with the same content, for
    duplicates and for copies of a refused file.
    """

    path: Path
    reason: Reason
    detail: str
    duplicate_of: Path | None = None


@dataclass(frozen=True)
class GoodFile:
    """A file that decodes within the limits; width and height are as stored in its header."""

    path: Path
    sha256: str
    width: int
    height: int


@dataclass
class CleanReport:
    """The result of one scan: usable files and findings, both in sorted path order."""

    root: Path
    scanned: int
    good: list[GoodFile] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def counts_by_reason(self) -> dict[str, int]:
        """Number of findings per reason code, keys sorted."""
        counts = Counter(finding.reason.value for finding in self.findings)
        return dict(sorted(counts.items()))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary with paths relative to the root (POSIX separators)."""
        return {
            "root": str(self.root),
            "scanned": self.scanned,
            "good_count": len(self.good),
            "counts_by_reason": self.counts_by_reason(),
            "good": [
                {
                    "path": self._relative(item.path),
                    "sha256": item.sha256,
                    "width": item.width,
                    "height": item.height,
                }
                for item in self.good
            ],
            "findings": [
                {
                    "path": self._relative(finding.path),
                    "reason": finding.reason.value,
                    "detail": finding.detail,
                    "duplicate_of": (
                        None
                        if finding.duplicate_of is None
                        else self._relative(finding.duplicate_of)
                    ),
                }
                for finding in self.findings
            ],
        }

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def scan_dataset(
    root: Path,
    limits: LimitSettings,
    *,
    check_decode: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CleanReport:
    """Walk `root` (sorted, symlinked folders not followed) and judge every entry by content.

    Raises `DataError` when `root` is not an existing folder; every per-file problem becomes a
    `Finding`. `progress`, if given, is called with the number of entries scanned so far.
    """
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder")
    report = CleanReport(root=root, scanned=0)
    # sha256 -> the outcome of the first file with that content, so copies are judged once.
    first_outcomes: dict[str, GoodFile | Finding] = {}
    for path, early_finding in _walk(root):
        outcome = early_finding or _judge_file(path, limits, check_decode, first_outcomes)
        if isinstance(outcome, Finding):
            report.findings.append(outcome)
            logger.debug("%s: %s (%s)", path, outcome.reason.value, outcome.detail)
        else:
            report.good.append(outcome)
        report.scanned += 1
        if progress is not None:
            progress(report.scanned)
    logger.info(
        "scanned %d entries under %s: %d usable, %d refused",
        report.scanned,
        root,
        len(report.good),
        len(report.findings),
    )
    return report


def _walk(root: Path) -> Iterator[tuple[Path, Finding | None]]:
    """Yield every non-folder entry below `root`, depth-first in name order (sorted path order).

    An entry that must not be opened (a symlinked folder, an unlistable folder) comes with its
    finding already made; the walk itself is the shared one (`core.storage.walk`).
    """
    try:
        items = walk_tree(os.fsencode(root), skip_folders={os.fsencode(QUARANTINE_FOLDER_NAME)})
    except OSError as error:
        yield root, Finding(root, Reason.UNREADABLE, f"cannot list: {describe(error)}")
        return
    try:
        for item in items:
            path = Path(os.fsdecode(item.path))
            if isinstance(item, Refused):
                yield path, Finding(path, item.reason, item.message)
            elif stat.S_ISLNK(item.status.st_mode) and path.is_dir():
                yield (
                    path,
                    Finding(path, Reason.NOT_A_FILE, "symbolic link to a folder; not followed"),
                )
            else:
                yield path, None
    finally:
        items.close()


def _judge_file(
    path: Path,
    limits: LimitSettings,
    check_decode: bool,
    first_outcomes: dict[str, GoodFile | Finding],
) -> GoodFile | Finding:
    try:
        # Links are followed: a dataset may link its files from elsewhere.
        data = read_file(path, limits.max_file_bytes)
    except ImageError as error:
        return Finding(path, error.reason, str(error))
    if not data:
        return Finding(path, Reason.EMPTY, "file is empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    earlier = first_outcomes.get(digest)
    if earlier is not None:
        return _judge_copy(path, earlier)
    outcome = _judge_content(path, data, digest, limits, check_decode)
    first_outcomes[digest] = outcome
    return outcome


def _judge_copy(path: Path, earlier: GoodFile | Finding) -> Finding:
    if isinstance(earlier, GoodFile):
        return Finding(
            path,
            Reason.DUPLICATE,
            f"same content as {earlier.path.name}",
            duplicate_of=earlier.path,
        )
    return Finding(path, earlier.reason, earlier.detail, duplicate_of=earlier.path)


def _judge_content(
    path: Path, data: bytes, digest: str, limits: LimitSettings, check_decode: bool
) -> GoodFile | Finding:
    try:
        header = preprocess.read_header(data)
        preprocess.check_limits(header, len(data), limits)
        # Scans, passes and memory are the file's own: refused here as training would refuse it.
        preprocess.check_decode_budget(data, header, _CHECK_SPEC, limits)
        if check_decode:
            preprocess.decode(data, header, _CHECK_SPEC)
    except ImageError as error:
        return Finding(path, error.reason, str(error))
    return GoodFile(path, digest, header.width, header.height)


def quarantine(
    report: CleanReport, destination: Path, *, reasons: set[Reason] | None = None
) -> list[tuple[Path, Path]]:
    """Move each finding's file to `destination/<path relative to root>`; never delete anything.

    Only findings whose reason is in `reasons` (all, when None) are moved. Entries that are not
    regular files or symlinks (FIFOs, sockets, devices, folders) stay where they are. An existing
    target is never overwritten: a numeric suffix is added instead. Raises `DataError` when
    `destination` lies inside the dataset root, where the next scan would find the files again.
    Returns the (from, to) pairs actually moved.
    """
    root = report.root.resolve()
    resolved_destination = destination.resolve()
    if resolved_destination.is_relative_to(root):
        raise DataError(
            f"quarantine folder {destination} is inside the dataset {report.root}; "
            "choose a folder outside it"
        )
    moved: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for finding in report.findings:
        if reasons is not None and finding.reason not in reasons:
            continue
        if finding.reason is Reason.NOT_A_FILE or finding.path in seen:
            continue
        seen.add(finding.path)
        if not _is_movable(finding.path):
            continue
        relative = finding.path.relative_to(report.root)
        target = _move_without_overwrite(finding.path, destination / relative)
        logger.info("quarantined %s -> %s (%s)", finding.path, target, finding.reason.value)
        moved.append((finding.path, target))
    return moved


def _is_movable(path: Path) -> bool:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        logger.warning("not quarantined, already gone: %s", path)
        return False
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return True
    logger.warning("not quarantined, %s left in place: %s", file_kind(mode), path)
    return False


def _move_without_overwrite(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate, suffix = target, 0
    # lexists, not exists: a broken symlink at the target is still something we must not replace.
    while os.path.lexists(candidate):
        suffix += 1
        candidate = target.with_stem(f"{target.stem}-{suffix}")
    shutil.move(source, candidate)  # a rename, or copy-then-remove across filesystems
    return candidate
