"""Image loading and LLaVA-1.5 preprocessing with PIL, numpy and torch only (no torchvision).

``preprocess_image(mode="resize")`` reproduces transformers' ``CLIPImageProcessor`` (PIL backend):
resize the shortest side to ``size`` with PIL bicubic (long side ``int(size * long / short)``),
centre crop ``size x size`` (top-left at ``(h - size) // 2, (w - size) // 2``), rescale by 1/255,
normalise with the tower's mean/std. ``mode="pad"`` first pads the image to a square on a canvas
of the mean colour, as LLaVA-1.5 does (``expand2square``), so no part of the image is cropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from barnfast.errors import SampleError

PREPROCESS_MODES = ("pad", "resize")


def resolve_image_path(root: str | Path, relative: str, allow_outside: bool = False) -> Path:
    """The file an ``image`` field names, which must lie inside ``root`` unless ``allow_outside``.

    Data is data: a record must not make the trainer read ``../../home/x/.ssh/id_rsa.png``, an absolute
    path or a symlink that points out of the image root. The check is on the fully resolved path
    (``..`` and every symlink followed), so it holds however the path is spelt. Raises ``SampleError``
    (the sample is skipped and listed); ``data.allow_outside_image_root = true`` turns the check off.
    """
    root = Path(root)
    path = Path(relative)
    if allow_outside:
        return path if path.is_absolute() else root / path
    if path.is_absolute():
        raise SampleError(f"image path {relative!r} is absolute; image paths are relative to the image root {root} "
                          f"(set data.allow_outside_image_root=true to allow it)")
    real_root = root.resolve()
    real = (root / path).resolve()
    if not real.is_relative_to(real_root):
        raise SampleError(f"image path {relative!r} leaves the image root {root} (it resolves to {real}; set "
                          f"data.allow_outside_image_root=true to allow it)")
    return root / path  # as the data spells it (inside the root), so logs and cache keys read as before


def load_image(path: str | Path) -> PIL.Image.Image:
    """Open ``path`` fully decoded as RGB.

    Raises ``SampleError("image not found: <path>")`` or ``SampleError("corrupt image <path>: <reason>")``
    (truncated files, non-images, decoder errors); PIL decodes lazily, so ``load()`` is forced here
    rather than failing later inside a DataLoader worker.
    """
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"image not found: {path}")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            # Palette/greyscale/alpha/16-bit images all become 8-bit RGB; alpha is dropped
            # (LLaVA does the same with .convert("RGB")).
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - OSError, zlib.error, SyntaxError, bombs...: any decoder error
        raise SampleError(f"corrupt image {path}: {type(e).__name__}: {e}") from e


def background_colour(mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The pad colour of LLaVA-1.5: ``int(255 * m)`` per channel (truncation, as LLaVA's
    ``tuple(int(x * 255) for x in image_processor.image_mean)``; CLIP → (122, 116, 104))."""
    return tuple(int(255 * m) for m in mean[:3])


def expand_to_square(img: PIL.Image.Image, background: tuple[int, int, int]) -> PIL.Image.Image:
    """LLaVA-1.5 ``expand2square``: paste ``img`` centred (offset ``(long - short) // 2``) on a
    ``long x long`` canvas filled with ``background``. A square image is returned unchanged."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = PIL.Image.new(img.mode, (side, side), tuple(background))
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_shortest_side(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # truncation, as transformers' get_resize_output_image_size
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return img.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)


def preprocess_image(
    img: PIL.Image.Image,
    *,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    mode: str = "pad",
) -> torch.Tensor:
    """One PIL image → normalised pixels ``(3, size, size)`` float32.

    ``mode``: ``"pad"`` (LLaVA-1.5: pad to square with :func:`background_colour`, then resize) or
    ``"resize"`` (CLIPImageProcessor as is: resize shortest side, centre crop).
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"mode must be one of {PREPROCESS_MODES}, got {mode!r}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if mode == "pad":
        img = expand_to_square(img, background_colour(mean))
    img = _resize_shortest_side(img, size)
    width, height = img.size
    top, left = (height - size) // 2, (width - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (S, S, 3) in 0..255
    pixels = pixels.permute(2, 0, 1) * (1.0 / 255.0)  # (3, S, S)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


@dataclass(frozen=True)
class ImageSpec:
    """What the data pipeline needs to know of a vision tower: how one image becomes its pixels.

    ``size``: side of the ``(3, size, size)`` output (S2: the tower's size times the largest scale);
    ``mean`` / ``std``: the tower's normalisation; ``mode``: ``"pad"`` or ``"resize"`` (see
    :func:`preprocess_image`). ``barnfast.models.vision.VisionTower.image_spec`` builds one, so that
    ``barnfast.data`` never imports the models.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "pad"

    def __post_init__(self):
        if self.mode not in PREPROCESS_MODES:
            raise ValueError(f"ImageSpec.mode must be one of {PREPROCESS_MODES}, got {self.mode!r}")

    def __call__(self, img: PIL.Image.Image) -> torch.Tensor:
        """``(3, size, size)`` float32 pixels of one image."""
        return preprocess_image(img, size=self.size, mean=self.mean, std=self.std, mode=self.mode)
