"""S2 multi-scale visual features ("Scaling on Scales", Shi et al. 2024; LLaVA-MORE §4.5).

The image is preprocessed once at the largest scale, ``image_size * max(scales)`` pixels a side
(as LLaVA-NeXT's ``CLIPVisionTowerS2`` sets its processor to the largest S2 size), and for each
scale ``s`` it is resized (bicubic, as ``s2wrapper``) to ``image_size * s`` and split into ``s x s``
tiles of the encoder's own size. All tiles of all scales go through the frozen encoder as one
batch (``1 + 4 + 9 = 14`` per image for scales 1, 2, 3). Each scale's tile features are put back
into one ``(s·g, s·g)`` feature map, area-pooled (average) to the base ``g x g`` grid, and the
scales are concatenated on channels:

    pixels (I, 3, s_max·S, s_max·S) ─► tiles (I·Σs², 3, S, S) ─► encoder ─► (I·Σs², g², C)
      └─ per scale: merge tiles (I, C, s·g, s·g) ─► area pool (I, C, g, g)
           └─ concat on channels ─► (I, g², C·len(scales))

so the number of visual tokens stays ``g²`` and the projector's input width is ``C·len(scales)``.
Scales ``[1]`` is the plain path, bit for bit (no resize, no pooling, same encoder call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from barnfast.models import vision as vision_lib
from barnfast.models.vision import VisionTower

MAX_SCALE = 4  # 1 + 4 + 9 + 16 = 30 encoder passes per image; beyond that nobody trains


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Validated S2 scales: integers, starting at 1, strictly increasing, at most ``MAX_SCALE``."""
    s = tuple(int(x) for x in scales)
    if not s or s[0] != 1 or any(b <= a for a, b in zip(s, s[1:])) or s[-1] > MAX_SCALE:
        raise ValueError(f"S2 scales must start at 1 and increase strictly up to {MAX_SCALE}, got {list(scales)}")
    return s


def input_size(tower: VisionTower, scales: Sequence[int]) -> int:
    """Side of the preprocessed image: ``image_size * max(scales)`` (336 → 672 for scales 1, 2)."""
    return tower.image_size * max(scales)


def _tiles(x: torch.Tensor, s: int) -> torch.Tensor:
    """(I, 3, s·S, s·S) → (I·s², 3, S, S), image-major, then row, then column."""
    I, C, H, W = x.shape
    S = H // s
    return x.reshape(I, C, s, S, s, S).permute(0, 2, 4, 1, 3, 5).reshape(I * s * s, C, S, S)


def _merge(features: torch.Tensor, num_images: int, s: int, g: int) -> torch.Tensor:
    """(I·s², g², C) tile features → (I, C, s·g, s·g) feature map (inverse of :func:`_tiles`)."""
    C = features.shape[-1]
    x = features.reshape(num_images, s, s, g, g, C)  # image, tile row, tile col, row, col, channel
    return x.permute(0, 5, 1, 3, 2, 4).reshape(num_images, C, s * g, s * g)


def encode_multiscale(tower: VisionTower, model, pixel_values: torch.Tensor, scales: Sequence[int] = (1,)
                      ) -> torch.Tensor:
    """``(I, 3, s_max·S, s_max·S)`` pixels → ``(I, num_tokens, hidden_size · len(scales))`` features.

    One call of :func:`barnfast.models.vision.encode_images` over every tile of every scale; in the
    encoder's dtype, without autograd.
    """
    scales = check_scales(scales)
    side = input_size(tower, scales)
    if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, side, side):
        raise ValueError(f"pixel_values must be (I, 3, {side}, {side}) for S2 scales {list(scales)} of "
                         f"{tower.name}, got {tuple(pixel_values.shape)}")
    if len(scales) == 1:
        return vision_lib.encode_images(tower, model, pixel_values)
    if not tower.drop_cls and tower.num_prefix_tokens:
        raise ValueError(f"S2 needs patch tokens only; {tower.name} keeps {tower.num_prefix_tokens} prefix tokens")
    I, g = pixel_values.shape[0], tower.grid
    tiles = []
    for s in scales:
        size = tower.image_size * s
        x = pixel_values
        if size != side:  # s2wrapper: bicubic in fp32, back to the input dtype
            x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).to(x.dtype)
        tiles.append(_tiles(x, s))
    feats = vision_lib.encode_images(tower, model, torch.cat(tiles))  # (I·Σs², g², C)
    out, start = [], 0
    for s in scales:
        n = I * s * s
        fmap = _merge(feats[start:start + n], I, s, g)
        start += n
        if s > 1:
            fmap = F.interpolate(fmap.float(), size=(g, g), mode="area").to(feats.dtype)
        out.append(fmap.flatten(2).transpose(1, 2))  # (I, g², C)
    return torch.cat(out, dim=-1)
