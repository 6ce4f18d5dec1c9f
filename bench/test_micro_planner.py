"""Epoch planner on LLaVA-665k-like lengths (``bench.bench_planner``): the numpy backend vs the native one.

The planner runs on the host on every machine, so the shapes are the real ones everywhere: 665,000
samples, 128 samples per optimizer step, 8 ranks, 8k and 16k-token micro-batches. No torch / Liger
providers: nothing else plans packed micro-batches.
"""

import functools

import pytest

from barnfast.data import packing
from bench.bench_planner import N_LLAVA_665K, llava665k_like_lengths

LENS = llava665k_like_lengths()


@pytest.mark.parametrize("backend", ["python", "native"])
@pytest.mark.parametrize("token_budget", [8192, 16384])
def test_plan_epoch(benchmark, backend, token_budget):
    if backend == "native" and not packing.HAS_NATIVE:
        pytest.skip(f"native planner not built: {packing.NATIVE_ERROR}")
    benchmark.group = f"plan_epoch n={N_LLAVA_665K} G=128 W=8 budget={token_budget}"
    fn = functools.partial(packing.plan_epoch, LENS, global_batch=128, token_budget=token_budget, world_size=8,
                           backend=backend)
    plan = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(provider=backend, micro_batches=plan.num_micro_batches)
