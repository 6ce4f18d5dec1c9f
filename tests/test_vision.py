"""Vision-tower registry, the tiny tower, and LLaVA's feature selection (layer -2, CLS dropped)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from barnfast.vision import ALLOW_DOWNLOAD_ENV, VISION_TOWERS, encode_images, from_name


@pytest.fixture(scope="module")
def tiny():
    tower = from_name("clip-tiny")
    return tower, tower.load(seed=0)


def test_registry():
    real = from_name("clip-l-336")
    assert (real.image_size, real.patch_size, real.hidden_size, real.num_tokens) == (336, 14, 1024, 576)
    assert real.feature_layer == -2 and real.drop_cls and not real.tiny
    assert real.hf_id == "openai/clip-vit-large-patch14-336"
    twin = from_name(real.tiny_twin)
    assert twin is from_name("clip-tiny") is VISION_TOWERS["clip-l-336-tiny"]
    assert twin.tiny and twin.family == real.family and twin.num_tokens == 16 and twin.hidden_size == 32
    assert (twin.mean, twin.std, twin.feature_layer, twin.drop_cls) == (
        real.mean,
        real.std,
        real.feature_layer,
        real.drop_cls,
    )
    cfg = real.vision_config()
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (24, 16, 4096)
    with pytest.raises(ValueError, match="unknown vision tower 'clip-huge'.*clip-l-336.*clip-tiny"):
        from_name("clip-huge")


def test_tiny_forward_shape_and_frozen(tiny):
    tower, model = tiny
    pixels = torch.randn(3, 3, tower.image_size, tower.image_size)
    feats = encode_images(tower, model, pixels)
    assert feats.shape == (3, tower.num_tokens, tower.hidden_size)
    assert not feats.requires_grad
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="pixel_values must be"):
        encode_images(tower, model, torch.randn(1, 3, 32, 32))


def test_matches_llava_get_image_features(tiny):
    """Our selection = transformers' LlavaModel.get_image_features(layer -2, "default") before the projector."""
    transformers = pytest.importorskip("transformers")
    tower, model = tiny
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    config = transformers.LlavaConfig(
        vision_config=tower.vision_config(),
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_id=63,
    )
    llava = transformers.LlavaModel(config).eval()
    llava.vision_tower.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
    with torch.no_grad():
        out = llava.get_image_features(
            pixels, vision_feature_layer=-2, vision_feature_select_strategy="default", output_hidden_states=True
        )
        ref = torch.stack(list(out.pooler_output))  # projected, (I, num_tokens, text hidden)
        ours = llava.multi_modal_projector(encode_images(tower, model, pixels))
        direct = model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(encode_images(tower, model, pixels), direct, rtol=0, atol=0)
    # Layer -2 is not the last layer: a selection bug (e.g. last_hidden_state) would not pass.
    assert not torch.allclose(direct, model(pixels).last_hidden_state[:, 1:])


def test_tiny_weights_deterministic(tiny):
    tower, model = tiny
    state_before = torch.get_rng_state()
    again = tower.load(seed=0)
    assert torch.equal(torch.get_rng_state(), state_before), "load() must not move the global RNG"
    other = tower.load(seed=1)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    weights = [k for k, v in model.state_dict().items() if v.dim() == 2]
    assert any(not torch.equal(model.state_dict()[k], other.state_dict()[k]) for k in weights)


def test_load_dtype_and_local_folder(tiny, tmp_path):
    tower, model = tiny
    model.save_pretrained(tmp_path / "tower")
    loaded = tower.load(str(tmp_path / "tower"), dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v.float(), ref[k].bfloat16().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects"):
        from_name("clip-l-336").load(str(tmp_path / "tower"))  # a tiny checkpoint for the real tower


def test_real_tower_without_weights_is_helpful(monkeypatch):
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    with pytest.raises(RuntimeError, match="--vision-path.*clip-l-336-tiny"):
        from_name("clip-l-336").load()


def test_preprocess_and_image_processor_agree(tiny):
    tower, _ = tiny
    rng = np.random.default_rng(3)
    img = PIL.Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    ours = tower.preprocess(img, mode="resize")
    ref = tower.image_processor()(images=img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, tower.image_size, tower.image_size)
    assert (ours - ref).abs().max().item() <= 1e-5
    padded = tower.preprocess(img)  # default: LLaVA-1.5 pad
    assert padded.shape == ours.shape and not torch.allclose(padded, ours)
    saved = tower.image_processor().to_dict()
    assert saved["image_processor_type"] == "CLIPImageProcessor"
    assert saved["crop_size"] == {"height": 56, "width": 56} and saved["size"] == {"shortest_edge": 56}
