"""Micro-batch planner: which samples form each optimizer step, and how each rank packs them.

Input: the token length of every sample (text tokens plus the visual tokens of its images), the
global batch in samples, a token budget per micro-batch and the number of ranks. Output: an
`EpochPlan` that the data loader and the trainer read step by step.

Algorithm, per epoch:

1. Order. ``order = Generator(PCG64(seed + epoch * EPOCH_PRIME)).permutation(n)``; step ``s`` holds
   ``order[s*G:(s+1)*G]`` (G = global batch, in samples, whatever the world size; gradient
   accumulation fills the gap). With ``drop_last`` the ``n % G`` last samples are left out
   (`EpochPlan.dropped`); without it the last step is shorter.
   With ``modality`` (LLaVA-1.5 stage 2's ``group_by_modality_length``), the permutation is then
   regrouped so that every step holds image samples only or text-only samples only: each modality
   keeps its samples in permutation order and is cut into chunks of G; every chunk but the last of
   each modality is a step, and these steps are shuffled by the same generator (its next draw); the
   two last chunks (the last one even when full, as LLaVA's ``get_modality_length_grouped_indices``)
   go at the end, their samples sorted by index, and fill the last one or two steps, the only mixed
   ones. LLaVA also sorts by length inside a step; here the packer (steps 2-3) handles length.
2. Ranks. Inside a step, longest-processing-time: samples by length, longest first (ties: earlier
   in the step first), each to the rank holding the fewest tokens so far (ties: lowest rank). The
   first ``world_size`` samples land on distinct ranks, so every rank gets at least one.
3. Micro-batches. Each rank packs its samples first-fit-decreasing (same order as in 2) into bins
   of ``token_budget`` tokens; bins are tried in the order they were opened. A sample longer than
   the budget fits nowhere, opens a bin of its own and leaves it closed (the trainer warns).
   Within a micro-batch samples are listed in data order (their position in the step).
   LPT evens the tokens per rank, hence the micro-batch count per rank to within about one; the
   counts may still differ: DDP syncs once per step and does not mind; under FSDP, which all-gathers in
   every forward, the trainer gives the ranks with fewer micro-batches zero-weighted filler passes.

Determinism rule: the step membership and order (step 1) depend only on (seed, epoch, n, G, and
the per-sample modality when grouped), never on the lengths nor the world size, so every backbone
of a sweep sees the same samples in the same steps; lengths (tokenizer-dependent) only change
steps 2 and 3. Steps 2 and 3 use integer arithmetic and fully specified tie-breaks, so the native
(C++, `csrc/planner.cpp`) and the numpy backends give identical plans (tested on random inputs).

A step with fewer samples than ranks cannot give every rank work: `plan_epoch` raises
`ValueError` (global_batch < world_size, or a short last step without ``drop_last``).

Complexity: O(n log G) for the per-step sorts, plus O(n log W) for LPT and O(n * B) for
first-fit (B = micro-batches per rank, a handful). Memory O(n).
Measured at n = 665,000 (LLaVA-665k-like lengths), G = 128, budget 8192, W = 8, on 2 shared CPU
cores (bench/bench_planner.py, bench/results/bench_planner_*), p50 including the 665k permutation:
numpy 0.19-0.31 s, native 0.08-0.13 s (range over two runs on differently loaded cores), both under
the 1 s target; W = 32, budget 4096: numpy 0.22-0.48 s, native 0.14-0.22 s.

Padding efficiency (logged per step) = real tokens / tokens computed; see `padded_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

try:
    from barnfast.data import _native

    HAS_NATIVE: bool = True
    NATIVE_ERROR: str | None = None
except ImportError as exc:  # built only with BARNFAST_BUILD_NATIVE=1 (see setup.py)
    _native = None
    HAS_NATIVE = False
    NATIVE_ERROR = f"barnfast.data._native not importable ({exc}); build with BARNFAST_BUILD_NATIVE=1"

# Mixes the epoch into the seed: seeds 0..EPOCH_PRIME-1 never collide with another (seed, epoch).
EPOCH_PRIME = 1_000_003

BACKENDS = ("auto", "native", "python")


@dataclass
class EpochPlan:
    """One epoch's plan as flat arrays (M micro-batches, N planned samples, S steps, W ranks).

    order:          (N,) int64 sample indices in data order; step s is order[step_offsets[s]:...[s+1]]
    step_offsets:   (S+1,) int64
    micro_samples:  (N,) int64 sample indices grouped by micro-batch, ascending data order inside one
    micro_offsets:  (M+1,) int64 micro-batch m is micro_samples[micro_offsets[m]:micro_offsets[m+1]]
    micro_step:     (M,) int64 step of each micro-batch; micro_rank: (M,) int64 its rank
    micro_tokens:   (M,) int64 real tokens of each micro-batch
    rank_micro_offsets: (S*W+1,) int64 micro-batches of (step s, rank r) are
                    range(rank_micro_offsets[s*W+r], rank_micro_offsets[s*W+r+1]); sorted by (step, rank)
    dropped:        (n-N,) int64 samples left out by drop_last (empty otherwise)
    """

    num_steps: int
    world_size: int
    token_budget: int
    order: np.ndarray
    step_offsets: np.ndarray
    micro_samples: np.ndarray
    micro_offsets: np.ndarray
    micro_step: np.ndarray
    micro_rank: np.ndarray
    micro_tokens: np.ndarray
    rank_micro_offsets: np.ndarray
    dropped: np.ndarray
    backend: str

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_step)

    def step_samples(self, step: int) -> np.ndarray:
        """(G,) sample indices of the step (the whole global batch), in data order."""
        self._check_step(step)
        return self.order[self.step_offsets[step] : self.step_offsets[step + 1]]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """That rank's micro-batches in that step, each an array of sample indices in data order."""
        self._check_step(step)
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range [0, {self.world_size})")
        g = step * self.world_size + rank
        lo, hi = self.rank_micro_offsets[g], self.rank_micro_offsets[g + 1]
        off = self.micro_offsets
        return [self.micro_samples[off[m] : off[m + 1]] for m in range(lo, hi)]

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range [0, {self.num_steps})")


def _validate(lengths, global_batch: int, token_budget: int, world_size: int, backend: str) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"lengths must be positive ints, got dtype {arr.dtype}")
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if bad.size:
            raise ValueError(f"lengths must be positive ints: lengths[{bad[0]}] = {arr[bad[0]]}")
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise ValueError(f"lengths must be positive ints: lengths[{bad[0]}] = {arr[bad[0]]}")
    sizes = {"global_batch": global_batch, "token_budget": token_budget, "world_size": world_size}
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def plan_epoch(
    lengths: Sequence[int] | np.ndarray,
    *,
    global_batch: int,
    token_budget: int,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    backend: str = "auto",
    modality: Sequence[bool] | np.ndarray | None = None,
) -> EpochPlan:
    """Plan one epoch (see the module docstring). ``lengths``: (n,) positive token counts per sample;
    ``modality``: None, or (n,) bools (True: the sample has an image) to make steps single-modality.

    backend: "native" (C++, raises if not built), "python" (numpy), "auto" (native when built).
    Raises ValueError on invalid arguments or when a step would hold fewer samples than ranks.
    """
    lens = _validate(lengths, global_batch, token_budget, world_size, backend)
    G, W, budget = int(global_batch), int(world_size), int(token_budget)
    n = len(lens)
    if G < W:
        raise ValueError(f"global_batch ({G}) < world_size ({W}): some rank would get no sample")
    n_used = (n // G) * G if drop_last else n
    if n_used % G and n_used % G < W:
        raise ValueError(
            f"the last step holds {n_used % G} samples (n={n}, global_batch={G}) < world_size ({W}); "
            "pass drop_last=True or change global_batch"
        )
    rng = np.random.Generator(np.random.PCG64(seed + epoch * EPOCH_PRIME))
    order = rng.permutation(n).astype(np.int64)
    if modality is not None:
        has_image = np.asarray(modality, dtype=bool)
        if has_image.shape != (n,):
            raise ValueError(f"modality must have one bool per sample, shape ({n},), got {has_image.shape}")
        order = _group_by_modality(order, has_image, G, rng)
    order, dropped = order[:n_used].copy(), order[n_used:].copy()
    num_steps = -(-n_used // G)
    step_offsets = np.minimum(np.arange(num_steps + 1, dtype=np.int64) * G, n_used)

    if backend == "native" and not HAS_NATIVE:
        raise RuntimeError(f"backend='native' requested but {NATIVE_ERROR}")
    use_native = backend == "native" or (backend == "auto" and HAS_NATIVE)
    if use_native:
        micro_samples = np.empty(n_used, dtype=np.int64)
        micro_offsets = np.empty(n_used + 1, dtype=np.int64)
        bins_per_rank = np.empty(num_steps * W, dtype=np.int64)
        m = _native.pack_steps(order, lens, G, W, budget, micro_samples, micro_offsets, bins_per_rank)
        micro_offsets = micro_offsets[: m + 1]
    else:
        micro_samples, micro_offsets, bins_per_rank = _pack_steps_numpy(order, lens, G, W, budget)

    rank_micro_offsets = np.zeros(num_steps * W + 1, dtype=np.int64)
    np.cumsum(bins_per_rank, out=rank_micro_offsets[1:])
    group = np.repeat(np.arange(num_steps * W, dtype=np.int64), bins_per_rank)
    cum = np.concatenate([[0], np.cumsum(lens[micro_samples])])
    return EpochPlan(
        num_steps=num_steps,
        world_size=W,
        token_budget=budget,
        order=order,
        step_offsets=step_offsets,
        micro_samples=micro_samples,
        micro_offsets=micro_offsets,
        micro_step=group // W,
        micro_rank=group % W,
        micro_tokens=cum[micro_offsets[1:]] - cum[micro_offsets[:-1]],
        rank_micro_offsets=rank_micro_offsets,
        dropped=dropped,
        backend="native" if use_native else "python",
    )


def _group_by_modality(order: np.ndarray, has_image: np.ndarray, G: int, rng: np.random.Generator) -> np.ndarray:
    """``order`` regrouped into single-modality steps of G, the two leftover chunks last (module docstring)."""
    in_order = has_image[order]
    groups = [order[in_order], order[~in_order]]
    if not (len(groups[0]) and len(groups[1])):
        return order  # one modality only: nothing to group
    steps, rest = [], []
    for g in groups:
        k = (len(g) - 1) // G  # full chunks before the last one
        steps += [g[i * G : (i + 1) * G] for i in range(k)]
        rest.append(g[k * G :])
    shuffled = [steps[i] for i in rng.permutation(len(steps))]
    return np.concatenate(shuffled + [np.sort(np.concatenate(rest))]).astype(np.int64)


def _pack_steps_numpy(order: np.ndarray, lens: np.ndarray, G: int, W: int, budget: int):
    """Steps 2 and 3 of the module docstring, vectorised across steps (loops run over G, not n).

    Returns micro_samples (N,), micro_offsets (M+1,), bins_per_rank (S*W,) — same as the native one.
    """
    n = len(order)
    S = -(-n // G)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64)
    # (S, G) grid of the steps in data order; the short last step is padded with length 0, which
    # sorts after every real sample and adds nothing to a rank's load.
    pos = np.full(S * G, -1, dtype=np.int64)
    pos[:n] = np.arange(n)
    grid_len = np.zeros(S * G, dtype=np.int64)
    grid_len[:n] = lens[order]
    grid_len = grid_len.reshape(S, G)
    by_len = np.argsort(-grid_len, axis=1, kind="stable")  # longest first, ties by position
    sorted_len = np.take_along_axis(grid_len, by_len, axis=1)  # (S, G)
    sorted_pos = np.take_along_axis(pos.reshape(S, G), by_len, axis=1)

    # LPT: column j of every step at once.
    rows = np.arange(S)
    load = np.zeros((S, W), dtype=np.int64)
    count = np.zeros((S, W), dtype=np.int64)
    rank = np.empty((S, G), dtype=np.int64)
    slot = np.empty((S, G), dtype=np.int64)  # index of the sample in its rank's list
    for j in range(G):
        r = load.argmin(axis=1)  # first minimum: ties go to the lowest rank
        rank[:, j] = r
        slot[:, j] = count[rows, r]
        load[rows, r] += sorted_len[:, j]
        count[rows, r] += 1

    real = sorted_len > 0
    g_of = (rows[:, None] * W + rank)[real]  # (N,) group = step * W + rank
    k_of = slot[real]
    len_of = sorted_len[real]
    pos_of = sorted_pos[real]
    K = int(k_of.max()) + 1
    items = np.zeros((S * W, K), dtype=np.int64)  # per group, its lengths longest first; 0 = none
    items[g_of, k_of] = len_of

    # First-fit-decreasing: item k of every group at once. rem = -1 marks a bin not opened yet,
    # and an over-budget sample leaves its bin at a negative remainder, so nothing joins it.
    nbins = np.zeros(S * W, dtype=np.int64)
    rem = np.full((S * W, 1), -1, dtype=np.int64)
    bin_of = np.empty((S * W, K), dtype=np.int64)
    for k in range(K):
        act = np.flatnonzero(items[:, k] > 0)
        L = items[act, k]
        fits = rem[act] >= L[:, None]
        has = fits.any(axis=1)
        b = np.where(has, fits.argmax(axis=1), nbins[act])
        if b.max() >= rem.shape[1]:
            rem = np.concatenate([rem, np.full_like(rem, -1)], axis=1)
        rem[act, b] = np.where(has, rem[act, b], budget) - L
        nbins[act] += ~has
        bin_of[act, k] = b

    base = np.zeros(S * W + 1, dtype=np.int64)
    np.cumsum(nbins, out=base[1:])
    micro_id = base[g_of] + bin_of[g_of, k_of]
    # Sort by (micro-batch, position in data order); one int64 key, exact while N * n < 2**63.
    perm = np.argsort(micro_id * n + pos_of, kind="stable")
    micro_samples = order[pos_of[perm]]
    micro_offsets = np.zeros(base[-1] + 1, dtype=np.int64)
    np.cumsum(np.bincount(micro_id, minlength=base[-1]), out=micro_offsets[1:])
    return micro_samples, micro_offsets, nbins


def padded_tokens(lengths_per_micro_batch: Iterable[Sequence[int]], packed: bool = True) -> int:
    """Tokens computed for these micro-batches: sum of lengths when packed (varlen attention
    computes every real token and nothing else), else batch size * longest sample per micro-batch."""
    total = 0
    for mb in lengths_per_micro_batch:
        mb = np.asarray(mb, dtype=np.int64)
        if mb.size:
            total += int(mb.sum()) if packed else int(mb.size * mb.max())
    return total


def padding_efficiency(lengths_per_micro_batch: Iterable[Sequence[int]], packed: bool = True) -> float:
    """Real tokens / tokens computed over these micro-batches (1.0 when packed; <= 1 when padded)."""
    mbs = [np.asarray(mb, dtype=np.int64) for mb in lengths_per_micro_batch]
    computed = padded_tokens(mbs, packed)
    return sum(int(mb.sum()) for mb in mbs) / computed if computed else 1.0
