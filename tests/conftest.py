"""Test tiers: pure planners and single-process units run everywhere; multi-rank
tests spawn gloo processes on CPU; tests marked ``gpu`` need CUDA and run on the
device machine (skipped here, never counted as passed)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/_dist.py and friends


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
