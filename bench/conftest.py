"""pytest-benchmark set-up of the microbenchmarks (``bench/test_micro_*.py``), kept out of the test suite.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/microbench_<device>_<date>.json
    pytest bench/ --benchmark-only -k flce --benchmark-group-by=group     # one op, providers side by side

``testpaths = ["tests"]`` keeps these files out of a plain ``pytest`` run. Triton is compiled for the GPU
here (no ``TRITON_INTERPRET``, unlike tests/conftest.py): on a CUDA machine every provider runs at the
registry's real shapes in bf16; elsewhere at small fp32 shapes, so that the whole CPU run finishes in a few
minutes on 2 cores (its numbers are CPU timings of the PyTorch paths, not predictions of a GPU).

Timing. Each benchmark is one group (op x shape x mode) holding one test per provider (barnfast, torch
eager, torch.compile, Liger where it has the op and is importable). On CUDA the timed callable ends with
``torch.cuda.synchronize()``, so pytest-benchmark's statistics are GPU time, and ``extra_info`` adds the
p20/p50/p80 of CUDA events around each call (``bench.harness.time_fn``) and the peak memory. No timing is
asserted anywhere: a benchmark fails only when its provider raises.
"""

from __future__ import annotations

import pytest
import torch

# `python -m pytest bench/` puts the repository root on sys.path, where the folder kernels/ looks like a
# top-level package `kernels`; transformers probes for the PyPI package of that name at import and, finding
# no metadata, imports ours a second time, re-registering the barnfast:: custom ops. Measured: when that
# happens after barnfast.kernels was imported, the next fused-loss call segfaults. Probing first makes the
# real barnfast.kernels the last (and consistent) registration.
import transformers.integrations.hub_kernels  # noqa: F401,I001  (before barnfast.kernels, see above)

from bench.harness import device_name, peak_memory_mb, time_fn

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 10 if CUDA else 3


def liger_or_skip(module: str, name: str):
    """A Liger-Kernel class, or a skip saying why (its ops are Triton kernels for CUDA tensors)."""
    if not CUDA:
        pytest.skip("liger: its Triton kernels need a CUDA GPU")
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError as e:
        pytest.skip(f"liger-kernel not importable: {e}")
    return getattr(mod, name)


@pytest.fixture
def measure(benchmark):
    """``measure(fn, group=..., **info)``: benchmark ``fn()`` (one call = one op), CUDA-event times in extra_info."""

    def run(fn, *, group: str, rounds: int = ROUNDS, **info):
        benchmark.group = group
        benchmark.extra_info.update(device=device_name(DEVICE), dtype=str(DTYPE).replace("torch.", ""), **info)
        fn()  # first call outside the statistics: torch.compile, Triton autotuning, first allocations
        if CUDA:
            t = time_fn(fn, DEVICE, warmup=2, reps=rounds)  # CUDA events
            benchmark.extra_info.update({f"cuda_event_{k}": v for k, v in t.items()})
            benchmark.extra_info["peak_mib"] = peak_memory_mb(fn, DEVICE)

            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)

    return run
