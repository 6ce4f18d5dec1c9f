"""Micro-batch planner (barnfast/data/packing.py, csrc/planner.cpp).

Checks the plan's invariants (coverage, budget, rank balance, length-independent step membership,
determinism), the numpy backend against a plain-loop reference of the algorithm, and the native
backend against the numpy one. The native module is compiled here into a temporary folder with g++
(about 2 s), so CI exercises it even when the package was installed without BARNFAST_BUILD_NATIVE.
"""

from __future__ import annotations

import heapq
import importlib.machinery
import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from barnfast.data import packing
from barnfast.data.packing import padded_tokens, padding_efficiency, plan_epoch
from bench.bench_planner import llava665k_like_lengths  # the benchmark's LLaVA-665k length model, one copy

ROOT = Path(__file__).resolve().parents[1]
PLAN_ARRAYS = ("order", "step_offsets", "micro_samples", "micro_offsets", "micro_step", "micro_rank",
               "micro_tokens", "rank_micro_offsets", "dropped")


def reference_plan(lengths, global_batch, token_budget, world_size, seed=0, epoch=0, drop_last=False):
    """The algorithm of the module docstring as plain loops: {(step, rank): [micro-batch, ...]}."""
    n = len(lengths)
    order = np.random.Generator(np.random.PCG64(seed + epoch * packing.EPOCH_PRIME)).permutation(n)
    if drop_last:
        order = order[: n // global_batch * global_batch]
    plan = {}
    for s, start in enumerate(range(0, len(order), global_batch)):
        step = [int(i) for i in order[start : start + global_batch]]
        by_len = sorted(range(len(step)), key=lambda j: (-lengths[step[j]], j))
        heap = [(0, r) for r in range(world_size)]
        per_rank = [[] for _ in range(world_size)]
        for j in by_len:
            load, r = heapq.heappop(heap)
            per_rank[r].append(j)
            heapq.heappush(heap, (load + lengths[step[j]], r))
        for r, items in enumerate(per_rank):
            rem, bins = [], []
            for j in items:
                b = next((b for b, left in enumerate(rem) if left >= lengths[step[j]]), None)
                if b is None:
                    rem.append(token_budget)
                    bins.append([])
                    b = len(bins) - 1
                rem[b] -= lengths[step[j]]
                bins[b].append(j)
            plan[s, r] = [[step[j] for j in sorted(bin_)] for bin_ in bins]
    return plan


def as_dict(plan):
    return {(s, r): [mb.tolist() for mb in plan.micro_batches(s, r)]
            for s in range(plan.num_steps) for r in range(plan.world_size)}


def assert_same_plan(a, b):
    assert a.num_steps == b.num_steps
    for name in PLAN_ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), (
            f"{name} differs ({a.backend} vs {b.backend}): shapes {x.shape} {y.shape}, "
            f"first mismatch at {np.flatnonzero(x[: len(y)] != y[: len(x)])[:1]}")


# (n, global_batch, token_budget, world_size, drop_last): friendly, over-budget-heavy, a short last
# step, one rank, one sample per rank, a global batch not a multiple of the world size.
CASES = [
    (1000, 64, 4096, 4, False),
    (777, 32, 700, 4, False),
    (777, 32, 1500, 8, True),
    (130, 17, 2000, 1, False),
    (96, 8, 3000, 8, False),
    (1003, 59, 8192, 7, False),
]


@pytest.mark.parametrize("n,G,budget,W,drop_last", CASES)
def test_python_matches_reference_loops(n, G, budget, W, drop_last):
    lens = llava665k_like_lengths(n, seed=n)
    plan = plan_epoch(lens, global_batch=G, token_budget=budget, world_size=W, seed=3, epoch=1,
                      drop_last=drop_last, backend="python")
    ref = reference_plan(lens.tolist(), G, budget, W, seed=3, epoch=1, drop_last=drop_last)
    assert as_dict(plan) == ref


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("W", [1, 3, 8])
def test_every_sample_exactly_once(W, drop_last):
    n, G = 1000, 48  # 1000 % 48 = 40 samples in the last step
    plan = plan_epoch(llava665k_like_lengths(n, 0), global_batch=G, token_budget=4096, world_size=W,
                      drop_last=drop_last, backend="python")
    assert plan.num_steps == (n // G if drop_last else -(-n // G))
    assert len(plan.dropped) == (n % G if drop_last else 0)
    seen = []
    for s in range(plan.num_steps):
        in_step = np.concatenate([mb for r in range(W) for mb in plan.micro_batches(s, r)])
        assert sorted(in_step.tolist()) == sorted(plan.step_samples(s).tolist())
        assert len(plan.step_samples(s)) == (G if s < n // G else n % G)
        seen.append(in_step)
    assert np.array_equal(np.sort(np.concatenate(seen + [plan.dropped])), np.arange(n))


def test_step_membership_ignores_lengths_and_world_size():
    """Every backbone of a sweep (different tokenizers) and every world size sees the same steps."""
    n, G = 2000, 128
    a = plan_epoch(llava665k_like_lengths(n, 1), global_batch=G, token_budget=8192, world_size=8, seed=7)
    b = plan_epoch(llava665k_like_lengths(n, 2) * 2, global_batch=G, token_budget=2048, world_size=2, seed=7)
    assert a.num_steps == b.num_steps
    for s in range(a.num_steps):
        assert np.array_equal(a.step_samples(s), b.step_samples(s))
    assert as_dict(a) != as_dict(b)  # the packing itself does follow the lengths


@pytest.mark.parametrize("budget", [600, 2048, 8192])
def test_micro_batches_within_budget(budget):
    lens = llava665k_like_lengths(3000, 5)
    plan = plan_epoch(lens, global_batch=128, token_budget=budget, world_size=4, backend="python")
    sizes = np.diff(plan.micro_offsets)
    tokens = np.add.reduceat(lens[plan.micro_samples], plan.micro_offsets[:-1])
    assert np.array_equal(plan.micro_tokens, tokens)
    over = plan.micro_tokens > budget
    assert np.all(sizes[over] == 1), "an over-budget micro-batch holds more than one sample"
    n_long = int((lens > budget).sum())
    assert int(over.sum()) == n_long and (n_long > 0) == (budget < 4096)
    position = np.argsort(plan.order)  # position in data order of every sample
    for lo, hi in zip(plan.micro_offsets[:-1], plan.micro_offsets[1:]):  # data order inside each micro-batch
        assert np.all(np.diff(position[plan.micro_samples[lo:hi]]) > 0)


def test_ranks_balanced_by_tokens():
    """LPT bound: per step, max rank load - min rank load <= the longest sample of the step."""
    lens = llava665k_like_lengths(4096, 9)
    W = 8
    plan = plan_epoch(lens, global_batch=256, token_budget=8192, world_size=W, backend="python")
    loads = np.zeros((plan.num_steps, W), dtype=np.int64)
    np.add.at(loads, (plan.micro_step, plan.micro_rank), plan.micro_tokens)
    for s in range(plan.num_steps):
        longest = lens[plan.step_samples(s)].max()
        assert loads[s].max() - loads[s].min() <= longest, (s, loads[s], longest)
        assert all(len(plan.micro_batches(s, r)) >= 1 for r in range(W))
    # On random data the spread is far below the bound: within 10% of the mean rank load.
    spread = (loads.max(1) - loads.min(1)) / loads.mean(1)
    assert spread.max() < 0.10, spread.max()


def test_deterministic_and_seeded():
    lens = llava665k_like_lengths(1500, 4)
    kw = dict(global_batch=100, token_budget=4096, world_size=4)
    assert_same_plan(plan_epoch(lens, seed=1, **kw), plan_epoch(lens.tolist(), seed=1, **kw))
    base = plan_epoch(lens, seed=1, **kw).order
    assert not np.array_equal(base, plan_epoch(lens, seed=2, **kw).order)
    assert not np.array_equal(base, plan_epoch(lens, seed=1, epoch=1, **kw).order)


def test_validation():
    kw = dict(global_batch=4, token_budget=100, backend="python")
    with pytest.raises(ValueError, match=r"lengths\[2\]"):
        plan_epoch([5, 6, 0, 7], **kw)
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        plan_epoch([5, -1, 0], **kw)
    with pytest.raises(ValueError, match=r"lengths\[0\]"):
        plan_epoch([2.5, 3.0], **kw)
    assert plan_epoch([5.0, 7.0], **kw).num_steps == 1  # integral floats are accepted
    for field, bad in (("global_batch", 0), ("token_budget", -3), ("world_size", 1.5)):
        with pytest.raises(ValueError, match=field):
            plan_epoch([5, 6], **{**kw, field: bad})
    with pytest.raises(ValueError, match="world_size"):
        plan_epoch([5] * 10, global_batch=2, token_budget=100, world_size=4)
    with pytest.raises(ValueError, match="drop_last"):  # 10 % 4 = 2 samples left for 3 ranks
        plan_epoch([5] * 10, global_batch=4, token_budget=100, world_size=3)
    assert plan_epoch([5] * 10, global_batch=4, token_budget=100, world_size=3, drop_last=True).num_steps == 2
    with pytest.raises(ValueError, match="backend"):
        plan_epoch([5], global_batch=1, token_budget=100, backend="cuda")
    empty = plan_epoch([], global_batch=4, token_budget=100)
    assert empty.num_steps == 0 and empty.num_micro_batches == 0


def test_native_backend_unavailable(monkeypatch):
    monkeypatch.setattr(packing, "HAS_NATIVE", False)
    monkeypatch.setattr(packing, "NATIVE_ERROR", "not built")
    with pytest.raises(RuntimeError, match="not built"):
        plan_epoch([5, 6], global_batch=2, token_budget=100, backend="native")
    assert plan_epoch([5, 6], global_batch=2, token_budget=100, backend="auto").backend == "python"


def test_padding_efficiency():
    mbs = [[3, 5], [4], [1, 1, 6]]
    assert padded_tokens(mbs, packed=True) == 20
    assert padded_tokens(mbs, packed=False) == 2 * 5 + 4 + 3 * 6
    assert padding_efficiency(mbs, packed=True) == 1.0
    assert padding_efficiency(mbs, packed=False) == pytest.approx(20 / 32)
    assert padding_efficiency([], packed=False) == 1.0


# ---- native == python ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_module(tmp_path_factory):
    """barnfast.data._native compiled from csrc/ into a temporary folder (independent of the install)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        if packing.HAS_NATIVE:
            return packing._native
        pytest.skip("no C++ compiler to build csrc/planner.cpp, and barnfast.data._native is not installed")
    out = tmp_path_factory.mktemp("native") / ("_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
           *map(str, sorted((ROOT / "csrc").glob("*.cpp"))), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"building the native planner failed:\n{' '.join(cmd)}\n{res.stderr}"
    loader = importlib.machinery.ExtensionFileLoader("barnfast.data._native", str(out))
    spec = importlib.util.spec_from_file_location("barnfast.data._native", str(out), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("n,G,budget,W,drop_last", CASES + [(20_000, 128, 8192, 8, False),
                                                            (20_000, 512, 16384, 16, True)])
@pytest.mark.parametrize("seed", [0, 11])
def test_native_matches_python(native_module, monkeypatch, n, G, budget, W, drop_last, seed):
    monkeypatch.setattr(packing, "_native", native_module)
    monkeypatch.setattr(packing, "HAS_NATIVE", True)
    lens = llava665k_like_lengths(n, seed)
    lens[::97] = 1  # shortest possible samples, and many ties
    kw = dict(global_batch=G, token_budget=budget, world_size=W, seed=seed, epoch=2, drop_last=drop_last)
    py, nat = plan_epoch(lens, backend="python", **kw), plan_epoch(lens, backend="native", **kw)
    assert (py.backend, nat.backend) == ("python", "native")
    assert_same_plan(py, nat)


def test_installed_native_matches_python():
    if not packing.HAS_NATIVE:
        pytest.skip(f"installed extension not checked: {packing.NATIVE_ERROR}")
    lens = llava665k_like_lengths(5000, 1)
    kw = dict(global_batch=128, token_budget=4096, world_size=8)
    assert_same_plan(plan_epoch(lens, backend="python", **kw), plan_epoch(lens, backend="native", **kw))


# ---- modality grouping (LLaVA-1.5 stage 2, group_by_modality_length) ------------------------------

def _modality(n, seed, text_share=0.2):
    return np.random.default_rng(seed).random(n) >= text_share  # True: has an image


@pytest.mark.parametrize("n,G,W,drop_last", [(1000, 48, 4, False), (1000, 48, 8, True), (777, 32, 1, False),
                                             (300, 128, 8, False)])
def test_modality_grouped_steps_are_single_modality(n, G, W, drop_last):
    lens, has_image = llava665k_like_lengths(n, 3), _modality(n, 3)
    plan = plan_epoch(lens, global_batch=G, token_budget=4096, world_size=W, seed=5, drop_last=drop_last,
                      modality=has_image, backend="python")
    kinds = [set(has_image[plan.step_samples(s)].tolist()) for s in range(plan.num_steps)]
    # every chunk of G but the last of each modality is a step of its own; LLaVA's leftovers (the last
    # chunk of each, together < 2G samples) fill the steps after them
    n_img, n_txt = int(has_image.sum()), int((~has_image).sum())
    pure = (n_img - 1) // G + (n_txt - 1) // G
    assert kinds[:pure].count({True}) == (n_img - 1) // G and kinds[:pure].count({False}) == (n_txt - 1) // G
    assert plan.num_steps - pure <= 2
    # the invariants of an ungrouped plan still hold: every sample once, G per step, the budget
    seen = np.concatenate([plan.order, plan.dropped])
    assert np.array_equal(np.sort(seen), np.arange(n))
    assert all(len(plan.step_samples(s)) == G for s in range(n // G))
    for s in range(plan.num_steps):
        in_step = np.concatenate([mb for r in range(W) for mb in plan.micro_batches(s, r)])
        assert sorted(in_step.tolist()) == sorted(plan.step_samples(s).tolist())
    assert np.all((plan.micro_tokens <= 4096) | (np.diff(plan.micro_offsets) == 1))


def test_modality_grouping_is_seeded_and_ignores_lengths_and_world_size():
    n, G = 2000, 128
    has_image = _modality(n, 1)
    a = plan_epoch(llava665k_like_lengths(n, 1), global_batch=G, token_budget=8192, world_size=8, seed=7,
                   modality=has_image)
    b = plan_epoch(llava665k_like_lengths(n, 2) * 2, global_batch=G, token_budget=2048, world_size=2, seed=7,
                   modality=has_image.tolist())
    assert np.array_equal(a.order, b.order)  # every backbone and rank: the same steps
    c = plan_epoch(llava665k_like_lengths(n, 1), global_batch=G, token_budget=8192, world_size=8, seed=8,
                   modality=has_image)
    assert not np.array_equal(a.order, c.order)
    ungrouped = plan_epoch(llava665k_like_lengths(n, 1), global_batch=G, token_budget=8192, world_size=8, seed=7)
    assert not np.array_equal(a.order, ungrouped.order)
    # one modality only: nothing to group, the plain seeded order
    same = plan_epoch(llava665k_like_lengths(n, 1), global_batch=G, token_budget=8192, world_size=8, seed=7,
                      modality=np.ones(n, bool))
    assert np.array_equal(same.order, ungrouped.order)
    with pytest.raises(ValueError, match="modality"):
        plan_epoch([5, 6, 7], global_batch=2, token_budget=100, modality=[True, False])


def test_modality_grouped_native_matches_python(native_module, monkeypatch):
    monkeypatch.setattr(packing, "_native", native_module)
    monkeypatch.setattr(packing, "HAS_NATIVE", True)
    n = 5000
    kw = dict(global_batch=128, token_budget=4096, world_size=8, seed=2, modality=_modality(n, 2))
    lens = llava665k_like_lengths(n, 2)
    assert_same_plan(plan_epoch(lens, backend="python", **kw), plan_epoch(lens, backend="native", **kw))
