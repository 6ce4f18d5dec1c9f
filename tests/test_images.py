"""Image loading errors and LLaVA-1.5 preprocessing, checked against transformers' CLIPImageProcessor."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from barnfast.data.images import background_colour, expand_to_square, load_image, preprocess_image
from barnfast.errors import SampleError
from barnfast.models.vision import CLIP_MEAN, CLIP_STD


def _random_image(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_load_image_rgb(tmp_path):
    path = tmp_path / "grey.png"
    PIL.Image.new("LA", (7, 5), (100, 200)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert img.getpixel((0, 0)) == (100, 100, 100)


def test_load_image_missing(tmp_path):
    with pytest.raises(SampleError, match="image not found: .*nope.png"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_load_image_corrupt(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        _random_image(40, 40).save(path)
        content = path.read_bytes()[:200]  # header intact, pixel data cut
    path.write_bytes(content)
    with pytest.raises(SampleError, match=r"corrupt image .*bad.png: \w+"):
        load_image(path)


@pytest.mark.parametrize("size", [(30, 50), (50, 30), (40, 40)])  # (w, h): wide, tall, square
def test_expand_to_square(size):
    img = _random_image(size[1], size[0])
    out = expand_to_square(img, (1, 2, 3))
    side = max(size)
    assert out.size == (side, side)
    arr, src = np.asarray(out), np.asarray(img)
    left, top = (side - size[0]) // 2, (side - size[1]) // 2
    np.testing.assert_array_equal(arr[top : top + size[1], left : left + size[0]], src)
    pad = np.ones(arr.shape[:2], bool)
    pad[top : top + size[1], left : left + size[0]] = False
    assert (arr[pad] == (1, 2, 3)).all() and pad.sum() == side * side - size[0] * size[1]


@pytest.mark.parametrize("hw", [(37, 91), (91, 37), (123, 59)])
def test_resize_mode_matches_clip_image_processor(hw):
    """Equal to transformers' CLIPImageProcessor (PIL backend, no torchvision) to float32 rounding."""
    transformers = pytest.importorskip("transformers")
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = 56
    processor = processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    img = _random_image(*hw, seed=hw[0])
    ref = processor(images=img, return_tensors="pt")["pixel_values"][0]
    ours = preprocess_image(img, size=size, mean=CLIP_MEAN, std=CLIP_STD, mode="resize")
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    diff = (ours - ref.float()).abs().max().item()
    assert diff <= 1e-5, f"max |ours - CLIPImageProcessor| = {diff:.3e}"


def test_pad_mode_is_expand2square_then_resize():
    size = 28
    img = _random_image(20, 50)
    ours = preprocess_image(img, size=size, mean=CLIP_MEAN, std=CLIP_STD, mode="pad")
    # Hand-computed: LLaVA-1.5 background int(255 * mean), square canvas, bicubic to (size, size).
    bg = tuple(int(255 * m) for m in CLIP_MEAN)
    assert bg == background_colour(CLIP_MEAN) == (122, 116, 104)
    canvas = PIL.Image.new("RGB", (50, 50), bg)
    canvas.paste(img, (0, 15))
    arr = np.asarray(canvas.resize((size, size), PIL.Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    ref = (arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    # The pad rows (top of the canvas) are the mean colour, i.e. close to 0 after normalisation.
    assert ours[:, 0, :].abs().max() < 0.02
    # Nothing of the wide image is cropped away in pad mode: its left and right columns are kept.
    resized = preprocess_image(img, size=size, mean=CLIP_MEAN, std=CLIP_STD, mode="resize")
    assert not torch.allclose(ours, resized)


def test_preprocess_non_rgb_and_bad_mode():
    img = PIL.Image.new("L", (10, 10), 255)
    out = preprocess_image(img, size=8, mean=CLIP_MEAN, std=CLIP_STD)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[:, 4, 4], expected)
    with pytest.raises(ValueError, match="mode"):
        preprocess_image(img, size=8, mean=CLIP_MEAN, std=CLIP_STD, mode="stretch")
