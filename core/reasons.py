"""The one vocabulary of stored reasons: why an image failed or was skipped, why a training file
was left out, why a message was refused. Values are stored in the ledger (`job_items.reason`,
`refused_messages.reason`) and read by scripts, so they never change; new ones are added.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why one input was not used; every stored reason is one of these."""

    # The file's content or size: the same file meets the same reason again (FINAL_FAILURES).
    EMPTY = "empty"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_TYPE = "unsupported_type"
    CORRUPT = "corrupt"
    POISON = "poison"  # its chunk's process died on it every time it was tried alone
    # Where the file is, or whether it can be reached: may pass on their own.
    UNREADABLE = "unreadable"
    NOT_A_FILE = "not_a_file"
    MISSING = "missing"
    # Outside the configured roots; for S3, a key with a `.` or `..` segment a store may resolve
    # outside the prefix.
    OUTSIDE_ROOT = "outside_root"
    SYMLINK_OUTSIDE_ROOT = "symlink_outside_root"
    SYMLINK_LOOP = "symlink_loop"
    DUPLICATE = "duplicate"
    # Our bug or an unforeseen library error, not the file's fault: a rescan sends it again.
    INTERNAL_ERROR = "internal_error"
    # A scan's decisions: not sent to the workers.
    # The model decided this version of the file: labeled it, or (a face model) found no face.
    ALREADY_LABELED = "already_labeled"
    ALREADY_FAILED = "already_failed"  # a worker failed on this version for a FINAL_FAILURES reason
    NOT_SELECTED = "not_selected"  # does not match every `--where` selection
    # A face model found no face (ledger state `no_face`); stored as a reason only by a
    # downgrade below revision 0003, which turns no_face rows into skipped ones.
    NO_FACE = "no_face"
    # Training data.
    NO_CLASS = "no_class"  # a training file that is not inside any class folder
    LABEL_CONFLICT = "label_conflict"  # the same content filed under two or more classes
    # A reviewed label a retraining run left out (`retrain_runs`' reviewed summary).
    STALE = "stale"  # the file changed since the person reviewed it
    UNKNOWN_CLASS = "unknown_class"  # a label the model being trained does not have
    WRONG_SUBJECT = "wrong_subject"  # a face label for a whole-image model, or the reverse
    FROZEN_TEST_COPY = "frozen_test_copy"  # the same content as a frozen test image
    # A chunk message the ledger disagrees with (`refused_messages`).
    MALFORMED = "malformed"  # wrong types, too many or too long URIs
    UNKNOWN_JOB = "unknown_job"
    UNKNOWN_CHUNK = "unknown_chunk"
    NOT_THE_CHUNKS_IMAGES = "not_the_chunks_images"


FINAL_FAILURES = frozenset(
    {
        Reason.EMPTY,
        Reason.TOO_SMALL,
        Reason.TOO_LARGE,
        Reason.TOO_MANY_PIXELS,
        Reason.NOT_AN_IMAGE,
        Reason.UNSUPPORTED_TYPE,
        Reason.CORRUPT,
        Reason.POISON,
    }
)
"""Failure reasons that the same file meets again: a scan does not enqueue it once more.

The others (`missing`, `unreadable`, `not_a_file`, `outside_root`) may pass on their own.
`--where failed`, `--force` and `emolabel failures --retry` send such images all the same.
"""

__all__ = ["FINAL_FAILURES", "Reason"]
