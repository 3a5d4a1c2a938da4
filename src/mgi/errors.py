"""One exception type per stage; each message names the file and what was wrong."""

from __future__ import annotations


class MgiError(Exception):
    """Base class of every error the `mgi` command reports without a traceback."""


class ConfigError(MgiError):
    """The workflow config is invalid (a key, a type or a value)."""


class AcquireError(MgiError):
    """Raw data could not be fetched or written."""


class ExpressionFileError(MgiError):
    """An expression file or table is malformed."""


class SeriesError(MgiError):
    """A DICOM series (or its masks) cannot be turned into a consistent volume."""


class SlideError(MgiError):
    """A whole-slide image cannot be read or tiled."""


class BankError(MgiError):
    """An image bank (HDF5) is missing fields or malformed."""


class TrainingError(MgiError):
    """Training inputs are inconsistent (no pairs, missing splits, shape mismatch)."""


class BundleError(MgiError):
    """A model bundle (mgi export) cannot be written, or is corrupted or of another format."""
