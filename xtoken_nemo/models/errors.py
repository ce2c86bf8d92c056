"""Errors raised by the model, conversion and scoring code."""

from xtoken_nemo.errors import XTokenError


class ModelError(XTokenError):
    """An HF config/checkpoint or a megatron-core checkpoint is unsupported, inconsistent or unreadable.

    The message names the config field or tensor that was wrong and what to do about it.
    """
