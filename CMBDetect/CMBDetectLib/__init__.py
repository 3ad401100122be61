"""CMBDetectLib: the cerebral microbleed detection engine (importable without Slicer)."""

__version__ = "0.1.0"
