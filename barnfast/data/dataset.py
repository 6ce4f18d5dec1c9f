"""A stage's samples, encoded once, validated, and served as micro-batches.

Every sample is encoded up front (chat template → input_ids and labels, each ``<image>``
expanded to ``num_image_tokens``: the model's ``visual_tokens_per_image``, i.e. the
projector's output count — the tower's for the MLP/linear projectors, the latents for the
perceiver) because the planner needs every length before the
first step. A sample that cannot be used — missing or corrupt image, no assistant turn, an empty
answer, longer than ``max_length`` (with ``overlong="skip"``), placeholder count that differs from its
images — is skipped, counted, and its
id and reason written to ``skipped_samples.jsonl``; the stage fails only when the skipped share
passes ``max_skip_fraction``. Nothing is dropped silently.

``overlong="truncate"`` is LLaVA-1.5's rule instead: ids and labels are cut at ``max_length`` after
``<image>`` expansion (LLaVA's collator cuts at ``model_max_length = 2048`` and ``llava_arch`` cuts the
expanded embeddings at ``tokenizer_model_max_length``; on expanded ids the two give the same cut). Two
cases LLaVA trains silently are skipped with their reason: a cut through an image's slots (LLaVA keeps
part of the image's 576 features) and a sample left with no target token before the cut (zero loss).

An image can still fail to decode later, when a micro-batch is built (``verify()`` at encode time
reads the headers and CRCs only, so a PNG whose compressed pixel data is corrupt passes it): that
sample stays in its micro-batch with zero pixels and every label -100, so it adds no loss, no
gradient and no target token to the step's normaliser, the plan, the micro-batch shapes and the data
order stay those of every rank and of a resumed run, and ``batch.dropped`` carries ``(id, reason)``
to the trainer, which lists it in ``skipped_samples.jsonl`` and counts it against the same threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from barnfast.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch, collate_packed, collate_padded
from barnfast.data.chat import encode_conversation
from barnfast.data.images import ImageSpec, load_image, resolve_image_path
from barnfast.data.llava import Sample, validate_sample
from barnfast.errors import SampleError


class TooManySkippedError(RuntimeError):
    """More than the allowed share of a stage's samples was skipped as bad input."""


@dataclass
class Encoded:
    id: str
    input_ids: np.ndarray  # (L,) int32
    labels: np.ndarray  # (L,) int32, -100 except assistant tokens
    images: list[Path]


def _check_image(path: Path) -> None:
    """Cheap validity check at encode time: the file exists and its header parses; full decode happens later."""
    if not path.is_file():
        raise SampleError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001 - any decoder error is a corrupt image
        raise SampleError(f"corrupt image {path}: {type(exc).__name__}: {exc}") from exc


def truncate(ids: list[int], labels: list[int], max_length: int, image_token_id: int) -> tuple[list[int], list[int]]:
    """``ids``/``labels`` cut at ``max_length`` (LLaVA-1.5's truncation); SampleError when the cut falls
    in an image's slots or leaves no target token."""
    if len(ids) <= max_length:
        return ids, labels
    if image_token_id in ids[max_length:]:  # slots of an image after the cut: a cut in or before it
        raise SampleError(f"{len(ids)} tokens: truncating at data.max_length={max_length} would cut an image's "
                          "visual tokens")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels):
        raise SampleError(f"no target token within the first data.max_length={max_length} tokens")
    return ids, labels


class StageDataset:
    """Encoded samples of one stage, with their token lengths for the planner."""

    def __init__(self, samples: list[Sample], *, tokenizer, template: str, image_token_id: int,
                 image_spec: ImageSpec, num_image_tokens: int, image_root: str | Path, max_length: int,
                 max_skip_fraction: float = 0.01, skipped_path: str | Path | None = None, show_progress: bool = True,
                 pad_id: int = 0, overlong: str = "skip", image_at_turn_start: bool = False,
                 allow_outside_image_root: bool = False, system: str | None = None):
        self.image_spec = image_spec  # the tower's preprocessing (size, mean/std, pad or resize)
        self.num_image_tokens = int(num_image_tokens)  # <image> expands to the projector's output count
        self.image_token_id = int(image_token_id)  # collate counts the placeholders on the host
        self.cache = None  # a VisionFeatureCache once use_vision_cache() is called
        self.image_keys: dict[Path, str] = {}
        self.pad_id = pad_id
        self.items: list[Encoded] = []
        self.skipped: list[tuple[str, str]] = []
        root = Path(image_root)
        for s in tqdm(samples, desc=f"encode ({template})", disable=not show_progress, mininterval=1.0):
            try:
                validate_sample(s)  # structure, roles, an assistant turn, placeholders == images
                if template == "plain" and len(s.images) != 1:
                    raise SampleError(f"stage-1 caption samples need exactly one image, got {len(s.images)}")
                paths = [resolve_image_path(root, p, allow_outside_image_root) for p in s.images]
                for p in paths:
                    _check_image(p)
                ids, labels = encode_conversation(tokenizer, template, s.conversations,
                                                  image_token_id=image_token_id,
                                                  num_image_tokens=self.num_image_tokens,
                                                  image_at_turn_start=image_at_turn_start, system=system)
                if len(ids) > max_length and overlong != "truncate":
                    raise SampleError(f"{len(ids)} tokens, longer than the context limit of {max_length} "
                                      "(data.max_length, data.overlong=skip)")
                ids, labels = truncate(ids, labels, max_length, image_token_id)
                if not any(x != -100 for x in labels):
                    raise SampleError("no target tokens after encoding (empty answers)")
                self.items.append(Encoded(s.id, np.asarray(ids, np.int32), np.asarray(labels, np.int32), paths))
            except SampleError as exc:
                self.skipped.append((s.id, str(exc)))
        self.lengths = np.array([len(e.input_ids) for e in self.items], dtype=np.int64)
        if skipped_path is not None:
            self.write_skipped(skipped_path)
        total = self.num_samples = len(samples)
        if total == 0:
            raise TooManySkippedError("the dataset is empty: no samples to train on")
        share = len(self.skipped) / total
        if not self.items:
            first = "; ".join(f"{i}: {r}" for i, r in self.skipped[:5])
            raise TooManySkippedError(f"none of the {total} samples can be trained on, all were skipped as bad input; "
                                      f"see {skipped_path}. First: {first}")
        if share > max_skip_fraction:
            first = "; ".join(f"{i}: {r}" for i, r in self.skipped[:5])
            raise TooManySkippedError(
                f"{len(self.skipped)} of {total} samples ({share:.1%}) were skipped as bad input, more than "
                f"data.max_skip_fraction={max_skip_fraction:.1%}; see {skipped_path}. First: {first}")

    def write_skipped(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for sid, reason in self.skipped:
                f.write(json.dumps({"id": sid, "reason": reason}) + "\n")

    def __len__(self) -> int:
        return len(self.items)

    def image_paths(self) -> list[Path]:
        """Every image of the kept samples, in order, without repeats."""
        return list(dict.fromkeys(p for e in self.items for p in e.images))

    def load_pixels(self, path: Path) -> torch.Tensor:
        """``(3, S, S)`` pixels of one image, preprocessed for the tower (``image_spec``)."""
        return self.image_spec(load_image(path))

    def pixels(self, i: int) -> torch.Tensor | None:
        paths = self.items[i].images
        if not paths:
            return None
        return torch.stack([self.load_pixels(p) for p in paths])

    def use_vision_cache(self, cache, keys: dict[Path, str]) -> None:
        """Serve packed micro-batches as cached tower features (``keys``: image path → cache key, from
        ``cache.fill``). Padded batches (the LLaVA-way baseline) keep pixels."""
        self.cache, self.image_keys = cache, dict(keys)

    def features(self, i: int) -> torch.Tensor | None:
        """``(n_i, P, C)`` cached features of sample ``i``'s images, None when it has none; ``KeyError``
        when an entry is missing or fails its size/CRC check (``packed`` then falls back to pixels)."""
        paths = self.items[i].images
        if not paths:
            return None
        feats = [self.cache.get(self.image_keys[p]) if p in self.image_keys else None for p in paths]
        if any(f is None for f in feats):
            raise KeyError(paths)
        return torch.stack(feats)

    def _sample_pixels(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        """``(pixels, None)`` of sample ``i``, or ``(zeros of that shape, reason)`` when an image fails to decode."""
        try:
            return self.pixels(i), None
        except SampleError as exc:
            size = self.image_spec.size
            return torch.zeros(len(self.items[i].images), 3, size, size), str(exc)

    def _gather(self, indices):
        """(input ids, labels, pixels, sample ids, dropped): a sample whose image fails to decode keeps
        its place with zero pixels and all labels -100, and ``(id, reason)`` goes to ``dropped``."""
        ids, labels, pixels, names, dropped = [], [], [], [], []
        for i in (int(i) for i in indices):
            item = self.items[i]
            px, error = self._sample_pixels(i)
            ids.append(item.input_ids)
            labels.append(item.labels if error is None else np.full_like(item.labels, IGNORE_INDEX))
            pixels.append(px)
            names.append(item.id)
            if error is not None:
                dropped.append((item.id, error))
        return ids, labels, pixels, names, dropped

    def packed(self, indices) -> PackedBatch:
        if self.cache is not None:
            idx = [int(i) for i in indices]
            try:
                feats = [self.features(i) for i in idx]
            except KeyError:  # an entry went bad after the fill pass: this micro-batch runs the tower
                feats = None
            if feats is not None:
                return collate_packed([self.items[i].input_ids for i in idx], [self.items[i].labels for i in idx],
                                      [None] * len(idx), [self.items[i].id for i in idx], features=feats,
                                      image_token_id=self.image_token_id)
        *parts, dropped = self._gather(indices)
        batch = collate_packed(*parts, image_token_id=self.image_token_id)
        batch.dropped = dropped  # read by the trainer before the batch moves to the device
        return batch

    def padded(self, indices) -> PaddedBatch:
        *parts, dropped = self._gather(indices)
        batch = collate_padded(*parts, pad_id=self.pad_id)
        batch.dropped = dropped
        return batch


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches of a list, built in DataLoader workers (image decoding and collation)."""

    def __init__(self, dataset: StageDataset, micro_batches: list[np.ndarray], packed: bool = True):
        self.dataset, self.micro_batches, self.packed = dataset, micro_batches, packed

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, k: int):
        mb = self.micro_batches[k]
        return self.dataset.packed(mb) if self.packed else self.dataset.padded(mb)
