"""Shared pytest setup: tests marked `gpu` run only where a CUDA GPU is usable."""

from __future__ import annotations

import pytest


def _gpu_reason() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    return ""


def pytest_collection_modifyitems(config, items):
    reason = _gpu_reason()
    if not reason:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
