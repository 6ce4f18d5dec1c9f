"""Tiny models and hand-built packed samples shared by the model and training tests."""

from __future__ import annotations

import functools

import numpy as np
import torch

from barnfast.data.batch import collate_packed, collate_padded
from barnfast.models import backbones, vision
from barnfast.models.vlm import build_model


@functools.cache
def _built(backbone: str, seed: int):
    return build_model(backbones.from_name(backbone), vision.from_name("clip-tiny"), seed=seed,
                       kernel_backend="torch")


def tiny_model(backbone: str = "llama1-tiny", seed: int = 0):
    """A fresh copy of a tiny (model, tokenizer); built once per process, deep-copied per test."""
    import copy

    model, tok = _built(backbone, seed)
    return copy.deepcopy(model), tok


def make_samples(model, n_images: list[int], text_lengths: list[int], seed: int = 0):
    """Samples with the given image counts and text lengths; images in odd places, labels on the second half."""
    rng = np.random.default_rng(seed)
    P = model.vision.num_tokens
    S = model.vision.image_size
    vocab = model.language_model.config.vocab_size - 64  # stay inside the real vocabulary
    ids, labels, pixels = [], [], []
    for n_img, n_txt in zip(n_images, text_lengths):
        text = rng.integers(3, vocab, size=n_txt)
        pieces, cut = [], np.sort(rng.integers(0, n_txt + 1, size=n_img))
        prev = 0
        for c in cut:  # image blocks at random places, several in a row when cuts coincide
            pieces += [text[prev:c], np.full(P, model.image_token_id)]
            prev = c
        pieces.append(text[prev:])
        x = np.concatenate(pieces).astype(np.int32)
        lab = np.where(x == model.image_token_id, -100, x).astype(np.int32)
        lab[: len(x) // 2] = -100
        ids.append(x)
        labels.append(lab)
        pixels.append(torch.randn(n_img, 3, S, S, generator=torch.Generator().manual_seed(seed + len(ids)))
                      if n_img else None)
    return ids, labels, pixels, [f"s{i}" for i in range(len(ids))]


def packed(samples, idx=None):
    ids, labels, pixels, names = samples
    idx = range(len(ids)) if idx is None else idx
    return collate_packed([ids[i] for i in idx], [labels[i] for i in idx], [pixels[i] for i in idx],
                          [names[i] for i in idx])


def padded(samples, pad_id=0):
    return collate_padded(*samples, pad_id=pad_id)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
