"""quamba-eval tests: tiny tensors run faster on one intra-op thread on small shared CPUs."""

from __future__ import annotations

import pytest
import torch

ONE_THREAD_MODULES = ("test_lm", "test_builtin_task", "test_perplexity_fidelity", "test_tasks")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    if request.module.__name__.rsplit(".", 1)[-1] not in ONE_THREAD_MODULES:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
