"""Vocabulary bridge: the projection matrix W, its builder and the coverage audit."""

from xtoken_nemo.vocab.projection import ProjectionMatrix

__all__ = ["ProjectionMatrix"]
