"""Errors of the data pipeline."""

from xtoken_nemo.errors import XTokenError


class DataError(XTokenError):
    """Input files, a preprocessed directory or a dataset request are unusable as given."""


class DatasetCorruptError(DataError):
    """A preprocessed ``.bin/.idx`` file is truncated or disagrees with its index or manifest."""
