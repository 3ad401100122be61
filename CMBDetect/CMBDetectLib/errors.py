"""Exceptions whose message is meant for the user (one clear sentence)."""

from __future__ import annotations


class CMBDetectError(Exception):
    """Base class of every error CMBDetect reports to the user."""


class InputError(CMBDetectError):
    """The image, mask or a parameter cannot be processed."""


class ModelError(CMBDetectError):
    """A model package is missing, incomplete or corrupted."""


class CancelledError(CMBDetectError):
    """The user cancelled a long operation."""


class OutputError(CMBDetectError):
    """An output file could not be written (full disk, read-only folder, ...)."""


class NotBetterError(CMBDetectError):
    """A fine-tuned model scored worse than its parent on the validation cases, so it was not registered.

    ``comparison`` is the :class:`CMBDetectLib.model_comparison.Comparison` the decision was made on,
    ``parent`` the label of the model that stays in use, ``validation_cases`` the cases compared on.
    """

    def __init__(self, message: str, comparison=None, parent: str | None = None,
                 validation_cases: list[str] | None = None):
        super().__init__(message)
        self.comparison = comparison
        self.parent = parent
        self.validation_cases = list(validation_cases or [])
