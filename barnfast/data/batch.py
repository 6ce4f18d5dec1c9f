"""Micro-batches: packed (one row of several samples, no padding) and padded (the LLaVA way).

Targets are the labels shifted by one *within each sample*: ``targets[t]`` is the label of token
``t + 1`` of the same sample, and -100 at every sample's last token, so no loss term ever
predicts the next sample's first token from the previous sample's last.

Everything the step needs to know *on the host* is counted here, at collate time, so a micro-step never
waits for the device: the sample boundaries (``cu_seqlens_host``), the rows that carry a loss term
(``target_rows``, moved to the device with the batch: the loss gathers them without a ``nonzero``) and
the number of ``<image>`` placeholders (``num_image_tokens``, checked against the projector's rows
without an ``.item()``). ``pin_memory()`` pins every tensor, so ``DataLoader(pin_memory=True)`` and
``to(device, non_blocking=True)`` copy asynchronously from page-locked memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

IGNORE_INDEX = -100


def shift_targets(labels: np.ndarray) -> np.ndarray:
    """(L,) labels → (L,) next-token targets of one sample, -100 at the last position."""
    out = np.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


def _map_tensors(batch, fn):
    """A copy of ``batch`` (a dataclass) with ``fn`` applied to each tensor field; other fields shared."""
    return replace(batch, **{f.name: fn(getattr(batch, f.name)) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


class _TokenCounts:
    """Token counts shared by both batch kinds (``input_ids`` and ``targets`` of the same shape)."""

    input_ids: torch.Tensor
    targets: torch.Tensor

    def pin_memory(self):
        """The batch with every tensor in page-locked memory: ``DataLoader(pin_memory=True)`` calls this on
        any object that has it (without it, the batch is passed through unpinned)."""
        return _map_tensors(self, lambda t: t.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = True):
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    @property
    def num_tokens(self) -> int:
        """Tokens computed: real tokens, plus padding in a padded batch."""
        return int(self.input_ids.numel())

    @property
    def num_targets(self) -> torch.Tensor:
        """Tokens with a loss term (0-dim tensor on the batch's device: no host sync)."""
        return (self.targets != IGNORE_INDEX).sum()


@dataclass
class PackedBatch(_TokenCounts):
    """One packed micro-batch of B samples and T tokens in total."""

    input_ids: torch.Tensor  # (T,) int64, image placeholders included
    targets: torch.Tensor  # (T,) int64, -100 where no loss
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 per sample
    cu_seqlens: torch.Tensor  # (B+1,) int32
    max_seqlen: int
    pixel_values: torch.Tensor | None  # (I, 3, S, S) for the images in order, or None
    sample_ids: list[str] = field(default_factory=list)
    # (I, P, C) frozen-tower features of the images in order, from the vision-feature cache, or None;
    # when set, pixel_values is None and the model skips the tower.
    visual_features: torch.Tensor | None = None
    # cu_seqlens as host ints: the attention fallback loops over them without reading the device
    cu_seqlens_host: tuple[int, ...] = ()
    # (k,) int64 positions whose target is not -100, in order; None: unknown (the loss finds them, one sync)
    target_rows: torch.Tensor | None = None
    # number of image placeholders in input_ids, counted on the host; None: unknown (the merge counts, one sync)
    num_image_tokens: int | None = None

    @property
    def num_images(self) -> int:
        for t in (self.pixel_values, self.visual_features):
            if t is not None:
                return int(t.shape[0])
        return 0



@dataclass
class PaddedBatch(_TokenCounts):
    """B samples right-padded to the longest, as the original LLaVA code batches them."""

    input_ids: torch.Tensor  # (B, S) int64, pad_id after each sample's end
    targets: torch.Tensor  # (B, S) int64, -100 at padding
    attention_mask: torch.Tensor  # (B, S) int64, 1 on real tokens
    pixel_values: torch.Tensor | None  # (I, 3, S, S)
    sample_ids: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])



def _stack_pixels(pixels: list[torch.Tensor]) -> torch.Tensor | None:
    pixels = [p for p in pixels if p is not None and p.numel()]
    return torch.cat(pixels, 0) if pixels else None


def collate_packed(ids: list[np.ndarray], labels: list[np.ndarray], pixels: list[torch.Tensor | None],
                   sample_ids: list[str], features: list[torch.Tensor | None] | None = None,
                   image_token_id: int | None = None) -> PackedBatch:
    """Concatenate samples into one packed row; ``pixels[i]`` is (n_i, 3, S, S) or None.

    ``features`` (cached tower output, ``features[i]`` (n_i, P, C) or None) replaces ``pixels``.
    ``image_token_id``: count the placeholders here (``num_image_tokens``), so the model need not."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    cu = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    input_ids = np.concatenate(ids).astype(np.int64)
    targets = np.concatenate([shift_targets(lab) for lab in labels]).astype(np.int64)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        targets=torch.from_numpy(targets),
        position_ids=torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lengths.max()),
        pixel_values=None if features is not None else _stack_pixels(pixels),
        sample_ids=list(sample_ids),
        visual_features=None if features is None else _stack_pixels(features),
        cu_seqlens_host=tuple(int(x) for x in cu),
        target_rows=torch.from_numpy(np.flatnonzero(targets != IGNORE_INDEX).astype(np.int64)),
        num_image_tokens=None if image_token_id is None else int((input_ids == image_token_id).sum()),
    )


def collate_padded(ids: list[np.ndarray], labels: list[np.ndarray], pixels: list[torch.Tensor | None],
                   sample_ids: list[str], pad_id: int) -> PaddedBatch:
    """Right-pad samples to the longest one of the micro-batch."""
    longest = max(len(x) for x in ids)
    B = len(ids)
    input_ids = torch.full((B, longest), pad_id, dtype=torch.int64)
    targets = torch.full((B, longest), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((B, longest), dtype=torch.int64)
    for b, (x, lab) in enumerate(zip(ids, labels)):
        n = len(x)
        input_ids[b, :n] = torch.from_numpy(x.astype(np.int64))
        targets[b, :n] = torch.from_numpy(shift_targets(lab).astype(np.int64))
        mask[b, :n] = 1
    return PaddedBatch(input_ids, targets, mask, _stack_pixels(pixels), list(sample_ids))
