"""Test setup: Triton runs in its interpreter, on CPU tensors, unless BARNFAST_CUDA_TESTS=1.

TRITON_INTERPRET must be set before triton (and so barnfast.kernels) is imported, hence here.
The CPU suite (CI) always interprets. ``bench/gpu.sh`` sets BARNFAST_CUDA_TESTS=1 and runs the
CUDA tests (``tests/test_kernels_cuda.py`` and the CUDA cases of other files), where the Triton
kernels are compiled for the device.
"""

import os

import torch

if not (torch.cuda.is_available() and os.environ.get("BARNFAST_CUDA_TESTS") == "1"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
