"""Evaluation of quantized Mamba: lm-eval integration, modes, statistics, layer comparison."""

__version__ = "0.1.0"
