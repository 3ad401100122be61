"""Exceptions whose message is meant for the user (one clear sentence)."""


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
