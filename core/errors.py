"""The errors emolabel raises on purpose, in one place.

    EmolabelError                  anything the user can act on; the CLI prints it as one line
    ├── ConfigError                a bad setting or a bad combination of settings
    ├── DataError                  a dataset folder that cannot be trained or evaluated on
    ├── ModelError                 an artifact that cannot be loaded or disagrees with its metadata
    └── ImageError                 one image that cannot be used; carries a reason code
        ├── ImageTooLarge          bytes or pixels over the limits (refused before decoding)
        └── UnsupportedImage       not an image of an accepted type, or not decodable

Per-image problems (`ImageError`) are data: the batch records them and goes on. Everything else is
raised to the caller.
"""

from __future__ import annotations

from enum import StrEnum


class EmolabelError(Exception):
    """Base class: a problem with a message a user can act on."""


class ConfigError(EmolabelError):
    """A setting, or a combination of settings, that cannot work."""


class DataError(EmolabelError):
    """A dataset folder that cannot be used for training or evaluation."""


class ModelError(EmolabelError):
    """A model artifact that is missing, unreadable, or disagrees with its metadata."""


class ReasonCode(StrEnum):
    """Why one input was refused; stored with failure rows, so values are stable."""

    EMPTY = "empty"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_TYPE = "unsupported_type"
    CORRUPT = "corrupt"
    DUPLICATE = "duplicate"
    UNREADABLE = "unreadable"
    NOT_A_FILE = "not_a_file"
    MISSING = "missing"
    OUTSIDE_ROOT = "outside_root"
    POISON = "poison"
    # Our bug or an unforeseen library error, not the file's fault: a rescan sends it again.
    INTERNAL_ERROR = "internal_error"
    NO_CLASS = "no_class"  # a training file that is not inside any class folder
    LABEL_CONFLICT = "label_conflict"  # the same content filed under two or more classes


class ImageError(EmolabelError):
    """One image that cannot be used; `reason` is a stable code, the message is for people."""

    def __init__(self, reason: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit, refused before it is decoded."""


class UnsupportedImage(ImageError):
    """Content that is not an image of an accepted type, or does not decode."""
