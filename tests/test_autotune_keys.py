"""The projector's autotune key settles: an epoch of LLaVA-665k-like packed micro-batches makes a handful of keys.

Each micro-batch's visual rows M = images x 576 go through the real launchers (``_projector_mlp_fwd`` /
``_projector_mlp_bwd``) on meta tensors; the launches are intercepted and their autotune key is computed the
way ``triton.runtime.autotuner.Autotuner.run`` computes it (the values of ``kernel.keys`` plus the tensors'
dtypes). A raw M in the key would give one key per distinct image count (dozens per epoch) for each of the
6 launches, each one a full benchmark of every config on every rank.
"""

import importlib

import numpy as np
import pytest
import torch

from barnfast.data.packing import plan_epoch
from bench.bench_planner import llava665k_like_samples
from bench.compile_report import PROJECTOR_LAUNCHES, projector_step_calls, record_launches

pm = importlib.import_module("barnfast.kernels.projector_mlp")

CLIP_L_TOKENS = 576
LAUNCHES = PROJECTOR_LAUNCHES  # launch order of _projector_mlp_fwd, _projector_mlp_bwd


def _images_per_micro_batch(n: int, token_budget: int, world_size: int) -> np.ndarray:
    lens, has_image = llava665k_like_samples(n, seed=0)
    plan = plan_epoch(lens, global_batch=128, token_budget=token_budget, world_size=world_size)
    per_sample = has_image[plan.micro_samples].astype(np.int64)
    return np.add.reduceat(per_sample, plan.micro_offsets[:-1])  # (micro-batches,) image counts


def _autotune_key(kernel, args, kwargs):
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _keys_of_epoch(image_counts, width=1024, hidden=4096, dtype=torch.bfloat16):
    keys = {name: set() for name in LAUNCHES}
    kernel = pm._projector_mlp_matmul_kernel
    with record_launches(kernel) as rec:
        for images in sorted(set(image_counts.tolist()) - {0}):  # a text-only micro-batch has no projector
            calls = projector_step_calls(rec, int(images) * CLIP_L_TOKENS, width, hidden, dtype, False)
            assert len(calls) == len(LAUNCHES)
            for name, (args, kw) in zip(LAUNCHES, calls):
                keys[name].add(_autotune_key(kernel, args, kw))
    return keys


@pytest.mark.parametrize("token_budget,world_size", [(8192, 8), (16384, 8)])
def test_an_epoch_of_packed_micro_batches_makes_a_handful_of_autotune_keys(token_budget, world_size):
    counts = _images_per_micro_batch(66_500, token_budget, world_size)  # a tenth of LLaVA-665k, same lengths
    distinct = set(counts.tolist()) - {0}
    keys = _keys_of_epoch(counts)
    per_launch = {name: len(k) for name, k in keys.items()}
    all_keys = set().union(*keys.values())
    print(f"budget {token_budget}: {len(distinct)} distinct image counts per micro-batch "
          f"({min(distinct)}-{max(distinct)}), autotune keys per launch {per_launch}, {len(all_keys)} in all")
    # the raw M would make one key per image count: the test is only meaningful if that is many
    assert len(distinct) >= 8, distinct
    # power-of-two buckets of M (and K = M in dw1/dw2) between a few images and a full budget of them
    assert max(per_launch.values()) <= 4 and 2 * max(per_launch.values()) <= len(distinct), per_launch
    assert len(all_keys) <= 4 * len(LAUNCHES), all_keys


def test_key_separates_launches_that_tune_differently_and_buckets_to_powers_of_two():
    # dh (GELU-grad epilogue) and fc2 (plain) have the same (M, N, K): one tuned config for both would
    # give dh a tile that spills (its config set is pruned), so the fused flags are part of the key
    keys = _keys_of_epoch(np.array([9]))
    assert keys["dh"].isdisjoint(keys["fc2"])
    assert [pm.autotune_bucket(n) for n in (1, 576, 1024, 1025, 5184, 9216)] == [16, 1024, 1024, 2048, 8192, 16384]


def test_prune_keeps_few_accumulators_per_thread_for_fused_launches_and_fp32_tiles_that_fit():
    configs = [
        pm.triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, s, w in [(128, 256, 3, 8), (128, 128, 4, 8), (128, 64, 4, 4), (128, 64, 4, 8)]
    ] + [pm.triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4)]
    bf16 = {"a_ptr": torch.empty(1, dtype=torch.bfloat16)}
    fp32 = {"a_ptr": torch.empty(1, dtype=torch.float32)}
    label = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cs]  # noqa: E731
    # accumulators per thread: 128, 64, 64, 32
    assert label(pm._prune_configs(configs, bf16, EPILOGUE=0)) == [(128, 256, 8), (128, 128, 8), (128, 64, 4)]
    assert label(pm._prune_configs(configs, bf16, EPILOGUE=1)) == [(128, 128, 8), (128, 64, 4)]
    assert label(pm._prune_configs(configs, bf16, EPILOGUE=2)) == [(128, 64, 8)]
    # fp32 operands: only the 32-deep FMA tiles, whatever the epilogue
    assert label(pm._prune_configs(configs, fp32, EPILOGUE=0)) == [(64, 64, 4)]
    assert label(pm._prune_configs(configs, fp32, EPILOGUE=2)) == [(64, 64, 4)]
    # and never more shared memory than an A100 block has: 4 stages of 128x256x64 hold 3 * (128*64 + 64*256) * 2 B
    # = 144 KiB (fits), 5 stages 192 KiB (dropped)
    deep = [pm.triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=s, num_warps=8)
            for s in (4, 5)]
    assert [c.num_stages for c in pm._prune_configs(deep, bf16, EPILOGUE=0)] == [4]
