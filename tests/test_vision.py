"""Vision-tower registry, the tiny tower, and LLaVA's feature selection (layer -2, CLS dropped)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from barnfast.models.vision import ALLOW_DOWNLOAD_ENV, VISION_TOWERS, encode_images, from_name


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


# -- the other encoders: SigLIP, SigLIP2, DINOv2, DINOv2 with registers ------------------------------

REAL = {  # name: (hf id, input size, tokens, width, mean, prefix tokens, drop them)
    "clip-l-336": ("openai/clip-vit-large-patch14-336", 336, 576, 1024, (0.48145466, 0.4578275, 0.40821073), 1, True),
    "siglip-so400m-384": ("google/siglip-so400m-patch14-384", 384, 729, 1152, (0.5, 0.5, 0.5), 0, False),
    "siglip2": ("google/siglip2-so400m-patch14-384", 384, 729, 1152, (0.5, 0.5, 0.5), 0, False),
    "dinov2-l": ("facebook/dinov2-large", 336, 576, 1024, (0.485, 0.456, 0.406), 1, True),
    "dinov2-l-reg": ("facebook/dinov2-with-registers-large", 336, 576, 1024, (0.485, 0.456, 0.406), 5, True),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_encoder_and_its_tiny_twin(name):
    hf_id, size, tokens, width, mean, prefix, drop = REAL[name]
    real = from_name(name)
    assert (real.hf_id, real.image_size, real.num_tokens, real.hidden_size, real.mean) == (hf_id, size, tokens,
                                                                                            width, mean)
    assert (real.num_prefix_tokens, real.drop_cls, real.feature_layer, real.tiny) == (prefix, drop, -2, False)
    twin = from_name(real.tiny_twin)
    assert twin.tiny and twin.name.endswith("-tiny") and twin.tiny_twin == twin.name
    same = ("family", "mean", "std", "feature_layer", "drop_cls", "num_prefix_tokens", "patch_size", "hidden_act")
    assert all(getattr(twin, f) == getattr(real, f) for f in same)
    cfg = real.vision_config()  # the real architecture, checked against the published configs
    assert cfg.hidden_size == width and cfg.num_hidden_layers == {"clip": 24, "siglip": 27}.get(real.family, 24)
    if real.family == "dinov2-reg":
        assert cfg.num_register_tokens == 4 and cfg.image_size == 518
    with pytest.raises(RuntimeError, match=f"--vision-path.*{real.tiny_twin}"):
        real.load()


@pytest.mark.parametrize("name", ["siglip2-tiny", "dinov2-l-tiny", "dinov2-l-reg-tiny"])
def test_prefix_tokens_dropped(name):
    tower = from_name(name)
    model = tower.load(seed=0)
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == tower.grid ** 2 + tower.num_prefix_tokens
    feats = encode_images(tower, model, pixels)
    assert feats.shape == (2, tower.num_tokens, tower.hidden_size) and tower.num_tokens == tower.grid ** 2
    assert torch.equal(feats, hidden[:, tower.num_prefix_tokens:])


@pytest.mark.parametrize("name", ["siglip2-tiny", "dinov2-l-tiny"])
def test_non_clip_tower_exports_to_llava_with_same_logits(name, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from barnfast.models import backbones
    from barnfast.models.export import export_hf
    from barnfast.models.vlm import build_model
    from tests.model_utils import make_samples, packed

    model, tok = build_model(backbones.from_name("llama1-tiny"), from_name(name), kernel_backend="torch")
    samples = make_samples(model, [1, 2], [6, 19])
    dest = export_hf(model, tok, tmp_path / "export")
    hf = LlavaForConditionalGeneration.from_pretrained(dest).eval()
    assert hf.config.vision_feature_select_strategy == ("full" if name.startswith("siglip") else "default")
    for i in (0, 1):
        one = packed(samples, [i])
        with torch.no_grad():
            theirs = hf(input_ids=one.input_ids[None], pixel_values=one.pixel_values).logits[0]
        torch.testing.assert_close(theirs, model.logits(one), rtol=1e-4, atol=1e-4)


PIPELINE = {  # tiny twin: extra options (the DINOv2-registers run also takes S2, the perceiver and the cache)
    "clip-l-336-tiny": [],
    "siglip-so400m-384-tiny": [],
    "siglip2-tiny": ["--projector", "linear"],
    "dinov2-l-tiny": [],
    "dinov2-l-reg-tiny": ["--projector", "perceiver", "--set", "model.perceiver_latents=8", "--s2", "1,2"],
}


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_tiny_twin_through_the_whole_pipeline(name, tmp_path):
    """Both stages (one step each) and the export, per encoder."""
    import json

    from barnfast.train import main

    out = tmp_path / "run"
    extra = PIPELINE[name] + (["--vision-cache", str(tmp_path / "vc")] if name == "dinov2-l-reg-tiny" else [])
    assert main(["--backbone", "llama1-tiny", "--vision", name, "--output-dir", str(out), "--max-steps", "1",
                 "--set", "data.synthetic_stage1=8", "--set", "data.synthetic_stage2=8", "--set",
                 "data.synthetic_eval=2", "--no-progress", *extra]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["stage1", "stage2"] and all(np.isfinite(r["loss"]) for r in rows)
    meta = json.loads((out / "export" / "barnfast.json").read_text())
    assert meta["vision"] == name
    if name == "dinov2-l-reg-tiny":
        assert meta["format"] == "barnfast" and meta["num_image_tokens"] == 8 and meta["s2_scales"] == [1, 2]
        assert list((tmp_path / "vc").rglob("*.bfv"))
        from barnfast.models.export import load_barnfast

        model, _ = load_barnfast(out / "export", kernel_backend="torch")
        assert model.projector.linear_1.in_features == 2 * from_name(name).hidden_size
    else:
        assert meta["format"] == "llava" and (out / "export" / "config.json").exists()
