"""Run Triton kernels under the interpreter when no CUDA device is present.

This must happen before any kernel module is imported, so it lives at the repository root,
which pytest loads first.
"""

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every direct kernel launch in the tests (and the servers they start) checks that its kept
# variant is the one Triton would pick (pegaflow.kernels.triton_copy.VERIFY_LAUNCH).
os.environ.setdefault("PEGAFLOW_VERIFY_LAUNCH", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
