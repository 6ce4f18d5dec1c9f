"""Test setup: Triton runs in its interpreter on machines without a CUDA GPU.

TRITON_INTERPRET must be set before triton (and so barnfast.kernels) is imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
