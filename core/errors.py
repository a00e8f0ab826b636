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

from core.reasons import Reason


class EmolabelError(Exception):
    """Base class: a problem with a message a user can act on."""


class ConfigError(EmolabelError):
    """A setting, or a combination of settings, that cannot work."""


class DataError(EmolabelError):
    """A dataset folder that cannot be used for training or evaluation."""


class ModelError(EmolabelError):
    """A model artifact that is missing, unreadable, or disagrees with its metadata."""


class ImageError(EmolabelError):
    """One image that cannot be used; `reason` is a stable code, the message is for people."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit, refused before it is decoded."""


class UnsupportedImage(ImageError):
    """Content that is not an image of an accepted type, or does not decode."""
