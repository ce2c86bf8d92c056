"""xtoken-nemo: cross-tokenizer knowledge distillation (X-Token) on megatron-core."""

__version__ = "0.1.0"
