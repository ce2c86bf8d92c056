"""Evaluation (lm-eval on exported students) and the paper-layout report."""
