"""S2 multi-scale features: scale 1 is the plain path bit for bit, shapes, tile layout, the model with S2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from barnfast.models import backbones, vision
from barnfast.models.s2 import check_scales, encode_multiscale, input_size
from barnfast.models.vision import encode_images
from barnfast.models.vlm import build_model


@pytest.fixture(scope="module", params=["clip-tiny", "siglip2-tiny"])
def tower(request):
    t = vision.from_name(request.param)
    return t, t.load(seed=3)


def test_scale_one_is_the_plain_path_bit_for_bit(tower):
    t, model = tower
    x = torch.randn(3, 3, t.image_size, t.image_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(encode_multiscale(t, model, x, [1]), encode_images(t, model, x))


@pytest.mark.parametrize("scales", [[1, 2], [1, 2, 3]])
def test_shapes(tower, scales):
    t, model = tower
    x = torch.randn(2, 3, input_size(t, scales), input_size(t, scales))
    out = encode_multiscale(t, model, x, scales)
    assert out.shape == (2, t.num_tokens, t.hidden_size * len(scales))
    with pytest.raises(ValueError, match="pixel_values must be"):
        encode_multiscale(t, model, torch.randn(2, 3, t.image_size, t.image_size), scales)


def test_tiles_are_merged_and_pooled_in_place(tower):
    """Scale 2 of image i = each of its 4 tiles encoded alone, put back in a 2g x 2g map, 2x2-averaged."""
    t, model = tower
    S, g, C = t.image_size, t.grid, t.hidden_size
    x = torch.randn(2, 3, 2 * S, 2 * S, generator=torch.Generator().manual_seed(1))
    out = encode_multiscale(t, model, x, [1, 2])
    base = encode_images(t, model, F.interpolate(x, size=(S, S), mode="bicubic", align_corners=False))
    torch.testing.assert_close(out[..., :C], base, rtol=0, atol=1e-5)
    for i in range(2):
        fmap = torch.zeros(C, 2 * g, 2 * g)
        for r in range(2):
            for c in range(2):
                tile = x[i:i + 1, :, r * S:(r + 1) * S, c * S:(c + 1) * S]
                fmap[:, r * g:(r + 1) * g, c * g:(c + 1) * g] = encode_images(t, model, tile)[0].T.reshape(C, g, g)
        want = fmap.reshape(C, g, 2, g, 2).mean((2, 4)).reshape(C, g * g).T
        torch.testing.assert_close(out[i, :, C:], want, rtol=0, atol=1e-5)
    # A transposed or shuffled layout would differ.
    assert not torch.allclose(out[0, :, C:], out[0, :, C:].reshape(g, g, C).transpose(0, 1).reshape(g * g, C))


def test_scales_are_validated():
    assert check_scales([1, 2, 3]) == (1, 2, 3)
    for bad in ([2], [1, 1], [1, 3, 2], [1, 5], []):
        with pytest.raises(ValueError, match="S2 scales"):
            check_scales(bad)


def test_model_with_s2_widens_the_projector_and_keeps_the_token_count():
    t = vision.from_name("clip-tiny")
    model, _ = build_model(backbones.from_name("llama1-tiny"), t, s2_scales=(1, 2, 3), kernel_backend="torch")
    assert model.projector.linear_1.in_features == 3 * t.hidden_size
    assert model.visual_tokens_per_image == t.num_tokens
    x = torch.randn(2, 3, 3 * t.image_size, 3 * t.image_size)
    feats = model.visual_features(x)
    assert feats.shape == (2, t.num_tokens, 3 * t.hidden_size)
    tokens = model.visual_tokens(x)
    assert tokens.shape == (2 * t.num_tokens, model.language_model.config.hidden_size)
    torch.testing.assert_close(model.visual_tokens(None, feats), tokens, rtol=0, atol=0)  # cached path == pixels
