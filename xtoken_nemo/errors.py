"""One exception family. Every message says what was wrong and what to do about it."""


class XTokenError(Exception):
    """Base of all errors raised on bad input by xtoken-nemo."""


class TokenizerError(XTokenError):
    """A tokenizer could not be loaded or lacks something the caller asked for."""


class ProjectionMatrixError(XTokenError):
    """A projection matrix W is unreadable or does not match the tokenizers/logits given."""


class LossInputError(XTokenError):
    """Logits, W, alignment or weights handed to a loss are inconsistent or non-finite."""
