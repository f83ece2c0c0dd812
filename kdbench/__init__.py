"""kdbench: a reproducibility benchmark suite for knowledge distillation of vision models."""

__version__ = "0.2.0"
