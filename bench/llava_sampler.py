"""LLaVA-1.5's ``group_by_modality_length`` sampler, re-implemented, for a fair LLaVA-recipe baseline.

What LLaVA does (``llava/train/llava_trainer.py``: ``LengthGroupedSampler(group_by_modality=True)``, used by
the 1.5 fine-tune with ``--group_by_modality_length True``; this is our own numpy implementation of the
behaviour, not its code):

1. lengths are signed: > 0 for samples with an image, < 0 for text-only ones (LLaVA counts words of the
   conversation; any length proxy keeps the behaviour);
2. each modality is shuffled, cut into *megabatches* of ``world_size * batch_size`` samples (LLaVA passes
   ``world_size * gradient_accumulation_steps``), each megabatch sorted by length, longest first, and split
   into ``world_size`` chunks of ``batch_size`` by a greedy "add to the chunk with the smallest total
   length" rule (``split_to_even_chunks``); a chunk is one rank's (or one accumulation step's) batch;
3. the megabatches of both modalities are shuffled together; the two last (partial) megabatches are
   joined into one extra megabatch (put first when it is full, last otherwise).

A rank's batch therefore holds samples of one modality drawn across the megabatch's length range (the
greedy split balances total length between chunks, it does not make each chunk uniform), and is padded
to its longest sample: that is the padding the LLaVA recipe really pays, which random batches overstate
and perfectly length-sorted batches understate.
"""

from __future__ import annotations

import numpy as np


def split_to_even_chunks(indices: np.ndarray, lengths: np.ndarray, num_chunks: int) -> list[np.ndarray]:
    """``indices`` (longest first) into ``num_chunks`` chunks of equal count and near-equal total length."""
    n = len(indices)
    if n % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = n // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = np.zeros(num_chunks, dtype=np.float64)
    for i in indices:
        c = int(np.argmin(totals))  # first of the smallest, as list.index(min(...))
        chunks[c].append(int(i))
        totals[c] += lengths[i]
        if len(chunks[c]) == per_chunk:
            totals[c] = np.inf
    return [np.asarray(c, dtype=np.int64) for c in chunks]


def megabatch_chunks(indices: np.ndarray, lengths: np.ndarray, num_chunks: int) -> list[np.ndarray]:
    """One megabatch as LLaVA splits it: sorted by length (longest first, stable), then even chunks."""
    indices = np.asarray(indices, dtype=np.int64)
    order = indices[np.argsort(-np.abs(lengths[indices]), kind="stable")]
    return split_to_even_chunks(order, np.abs(lengths), num_chunks)


def _length_grouped(lengths: np.ndarray, batch_size: int, world_size: int, rng: np.random.Generator) -> np.ndarray:
    perm = rng.permutation(len(lengths))
    mega = world_size * batch_size
    out = [np.concatenate(megabatch_chunks(perm[i : i + mega], lengths, world_size))
           for i in range(0, len(perm), mega)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def modality_length_grouped_indices(signed_lengths, batch_size: int, world_size: int, seed: int = 0) -> np.ndarray:
    """The epoch's sample order of LLaVA's sampler; consecutive ``batch_size`` slices are the rank batches.

    ``signed_lengths``: (n,) ints, > 0 with an image, < 0 text-only, never 0.
    """
    lengths = np.asarray(signed_lengths, dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("modality_length_grouped_indices: a length is 0 (its sign carries the modality)")
    rng = np.random.default_rng(seed)
    mega = world_size * batch_size
    groups = []
    for mask in (lengths > 0, lengths < 0):
        idx = np.flatnonzero(mask)
        order = idx[_length_grouped(np.abs(lengths[idx]), batch_size, world_size, rng)] if len(idx) else idx
        groups.append([order[i : i + mega] for i in range(0, len(order), mega)])
    mm, lang = groups
    extra = np.concatenate([mm[-1] if mm else [], lang[-1] if lang else []]).astype(np.int64)
    megabatches = mm[:-1] + lang[:-1]
    megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
    if len(extra) >= mega:
        megabatches = [extra[:mega]] + megabatches
        extra = extra[mega:]
    if len(extra):
        megabatches.append(extra)
    return np.concatenate(megabatches) if megabatches else np.zeros(0, dtype=np.int64)


def rank_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The sampler's order cut into the batches the ranks (and accumulation steps) take in turn."""
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
