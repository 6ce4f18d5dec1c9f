"""Projectors: perceiver shapes and gradients, linear == Llava's projector with act "linear", model and export."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from barnfast.models import backbones, vision
from barnfast.models.export import export_hf, load_barnfast, read_meta
from barnfast.models.projectors import LinearProjector, PerceiverResampler, build_projector
from barnfast.models.vlm import build_model
from tests.model_utils import make_samples, packed


@pytest.mark.parametrize("I,P,C,H,N,depth", [(3, 16, 32, 64, 8, 3), (2, 13, 37, 48, 5, 1)])
def test_perceiver_shapes_and_gradients(I, P, C, H, N, depth):
    torch.manual_seed(0)
    proj = PerceiverResampler(C, H, num_latents=N, depth=depth)
    x = torch.randn(I, P, C, requires_grad=True)
    out = proj(x)
    assert out.shape == (I, N, H) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    # Images do not see each other: changing image 0 leaves image 1's latents as they were.
    y = x.detach().clone()
    y[0] += 1.0
    with torch.no_grad():
        a, b = proj(x.detach()), proj(y)
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0], b[0])


def test_linear_projector_is_llava_projector_with_identity_second_layer():
    torch.manual_seed(0)
    lin = LinearProjector(37, 48)
    cfg = types.SimpleNamespace(vision_config=types.SimpleNamespace(hidden_size=37),
                                text_config=types.SimpleNamespace(hidden_size=48), projector_hidden_act="linear",
                                multimodal_projector_bias=True, vision_feature_layer=-2)
    ref = LlavaMultiModalProjector(cfg)
    ref.load_state_dict(lin.llava_state_dict(), strict=True)
    x = torch.randn(5, 7, 37)
    assert torch.equal(ref(x), lin(x))


def test_build_projector_rejects_unknown():
    with pytest.raises(ValueError, match="unknown projector 'qformer'"):
        build_projector("qformer", 4, 8)


def _samples(model, n_images, lengths):
    """make_samples with the model's <image> slot count (the projector's output, not the tower's)."""
    S = model.vision.image_size * max(model.s2_scales)
    fake = types.SimpleNamespace(vision=types.SimpleNamespace(num_tokens=model.visual_tokens_per_image, image_size=S),
                                 language_model=model.language_model, image_token_id=model.image_token_id)
    return make_samples(fake, n_images, lengths)


def test_perceiver_model_packed_equals_per_sample_and_exports_in_barnfast_format(tmp_path):
    model, tok = build_model(backbones.from_name("llama1-tiny"), vision.from_name("clip-tiny"), projector="perceiver",
                             perceiver_latents=6, perceiver_depth=2, kernel_backend="torch")
    assert model.visual_tokens_per_image == 6
    samples = _samples(model, [1, 0, 2], [9, 30, 14])
    full = model.logits(packed(samples))
    cu = packed(samples).cu_seqlens.tolist()
    for i in range(3):
        torch.testing.assert_close(full[cu[i]:cu[i + 1]], model.logits(packed(samples, [i])), rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="barnfast's format.*perceiver"):
        dest = export_hf(model, tok, tmp_path / "export", meta={"backbone": "llama1-tiny"})
    meta = read_meta(dest)
    assert meta["format"] == "barnfast" and meta["projector"] == "perceiver" and meta["num_image_tokens"] == 6
    assert not (dest / "config.json").exists()  # transformers must not load it with a random projector
    loaded, tok2 = load_barnfast(dest, kernel_backend="torch")
    assert len(tok2) == len(tok) and tok2.convert_tokens_to_ids("<image>") == model.image_token_id
    for i in (0, 2):
        one = packed(samples, [i])
        torch.testing.assert_close(loaded.logits(one), model.logits(one), rtol=0, atol=0)


def test_linear_projector_exports_to_llava_with_same_logits(tmp_path):
    model, tok = build_model(backbones.from_name("llama3-tiny"), vision.from_name("clip-tiny"), projector="linear",
                             kernel_backend="torch")
    samples = _samples(model, [2], [11])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to barnfast's format
        dest = export_hf(model, tok, tmp_path / "export")
    hf = LlavaForConditionalGeneration.from_pretrained(dest).eval()
    assert hf.config.projector_hidden_act == "linear"
    one = packed(samples)
    with torch.no_grad():
        theirs = hf(input_ids=one.input_ids[None], pixel_values=one.pixel_values).logits[0]
    torch.testing.assert_close(theirs, model.logits(one), rtol=1e-4, atol=1e-4)
