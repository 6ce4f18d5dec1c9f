"""Vision-feature cache: bit-identical hits, corrupt entries recomputed, disk check, a sweep encodes each image once."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from barnfast import sweep
from barnfast.data import vision_cache as vc
from barnfast.models import vision
from barnfast.models.vision import encode_images


@pytest.fixture(scope="module")
def tower():
    t = vision.from_name("siglip2-tiny")
    return t, t.load(seed=0)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 70), (56, 56), (90, 33), (61, 20), (56, 56)]):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    shutil.copy(paths[0], tmp_path / "img" / "copy_of_0.png")  # same bytes: one entry
    return [*paths, tmp_path / "img" / "copy_of_0.png"]


def _cache(tmp_path, t, dtype="fp16", **kw):
    settings = vc.settings_for(t, s2_scales=kw.pop("s2_scales", (1,)), image_aspect=kw.pop("aspect", "pad"),
                               dtype=dtype, seed=kw.pop("seed", 0))
    return vc.VisionFeatureCache(tmp_path / "cache", settings)


class Counter:
    def __init__(self, t, model):
        self.t, self.model, self.images = t, model, 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return encode_images(self.t, self.model, pixels)


def _load(t):
    return lambda p: t.preprocess(Image.open(p).convert("RGB"))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_hits_are_bit_identical_to_recomputation(tmp_path, tower, images, dtype):
    t, model = tower
    cache, enc = _cache(tmp_path, t, dtype), Counter(t, model)
    logs = []
    keys = cache.fill(images, _load(t), enc, batch_size=2, show_progress=False, log=logs.append)
    assert enc.images == 5  # the copy shares its original's entry
    assert "5 to encode" in logs[0] and f"{vc.human_bytes(5 * cache.settings.entry_bytes)}" in logs[0]
    torch_dtype = vc.DTYPES[dtype][0]
    for p in images:
        fresh = encode_images(t, model, _load(t)(p)[None])[0].to(torch_dtype)
        hit = cache.get(keys[p])
        assert hit.dtype == torch_dtype and torch.equal(hit, fresh), p
    again = Counter(t, model)
    cache.fill(images, _load(t), again, show_progress=False, log=None)
    assert again.images == 0


def test_settings_separate_entries(tmp_path, tower):
    t, _ = tower
    dirs = {_cache(tmp_path, t).dir, _cache(tmp_path, t, "bf16").dir, _cache(tmp_path, t, seed=1).dir,
            _cache(tmp_path, t, aspect="resize").dir, _cache(tmp_path, t, s2_scales=(1, 2)).dir,
            vc.VisionFeatureCache(tmp_path, vc.settings_for(vision.from_name("clip-tiny"), s2_scales=(1,),
                                                            image_aspect="pad", dtype="fp16", seed=0)).dir}
    assert len(dirs) == 6


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "empty"])
def test_corrupted_entry_is_detected_and_recomputed(tmp_path, tower, images, damage):
    t, model = tower
    cache = _cache(tmp_path, t)
    keys = cache.fill(images, _load(t), Counter(t, model), show_progress=False, log=None)
    victim = cache.path(keys[images[2]])
    good = cache.get(keys[images[2]]).clone()
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 7]
    elif damage == "flip_payload":
        raw[vc.HEADER_BYTES + 101] ^= 0x40
    elif damage == "flip_header":
        raw[9] ^= 0x01  # P
    else:
        raw = bytearray()
    victim.write_bytes(bytes(raw))
    assert cache.get(keys[images[2]]) is None
    enc, logs = Counter(t, model), []
    cache.fill(images, _load(t), enc, show_progress=False, log=logs.append)
    assert enc.images == 1 and "1 truncated/corrupt" in logs[0]
    assert torch.equal(cache.get(keys[images[2]]), good)


def test_refuses_when_the_disk_cannot_hold_it(tmp_path, tower, images, monkeypatch):
    t, model = tower
    cache = _cache(tmp_path, t)
    real = shutil.disk_usage
    monkeypatch.setattr(vc.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    enc = Counter(t, model)
    with pytest.raises(vc.VisionCacheDiskError, match="5 images need .* but the disk has 10.0 KB free"):
        cache.fill(images, _load(t), enc, show_progress=False, log=None)
    assert enc.images == 0 and not list(cache.dir.rglob("*.bfv"))


def test_dataset_falls_back_to_pixels_when_an_entry_goes_bad(tmp_path, tower, images):
    from barnfast.data.dataset import StageDataset
    from barnfast.data.llava import Sample
    from barnfast.models.backbones import from_name
    from barnfast.models.vlm import add_image_token

    t, model = tower
    tok = from_name("llama1-tiny").load_tokenizer()
    image_id = add_image_token(tok)
    samples = [Sample(id=f"s{i}", images=[p.name], conversations=[{"from": "human", "value": "<image>\nWhat?"},
                                                                 {"from": "gpt", "value": "A picture."}])
               for i, p in enumerate(images[:3])]
    data = StageDataset(samples, tokenizer=tok, template="plain", image_token_id=image_id,
                        image_spec=t.image_spec(), num_image_tokens=t.num_tokens,
                        image_root=images[0].parent, max_length=512, show_progress=False)
    cache = _cache(tmp_path, t)
    keys = cache.fill(data.image_paths(), data.load_pixels, Counter(t, model), show_progress=False, log=None)
    data.use_vision_cache(cache, keys)
    b = data.packed([0, 1, 2])
    assert b.pixel_values is None and b.visual_features.shape == (3, t.num_tokens, t.hidden_size)
    cache.path(keys[images[1]]).write_bytes(b"garbage")
    b = data.packed([0, 1, 2])
    assert b.visual_features is None and b.pixel_values.shape == (3, 3, t.image_size, t.image_size)
    assert data.packed([0]).visual_features is not None  # other micro-batches still read the cache


def test_two_backbone_sweep_encodes_each_image_once(tmp_path, monkeypatch):
    """barnfast.sweep passes DIR/vision_cache to every run: the second backbone never runs the tower."""
    seen: list[int] = []
    real = vision.encode_images

    def counting(tower, model, pixel_values):
        seen.append(pixel_values.shape[0])
        return real(tower, model, pixel_values)

    monkeypatch.setattr(vision, "encode_images", counting)
    out = tmp_path / "sweep"
    args = ["--max-steps", "2", "--stage1-samples", "24", "--stage2-samples", "16", "--eval-samples", "4",
            "--no-eval", "--no-progress"]
    assert sweep.main(["--backbones", "llama1-tiny,llama3-tiny", "--output-dir", str(out), *args]) == 0
    data = out / "data"
    files = {p for stage in ("stage1", "stage2") for s in json.loads((data / f"{stage}.json").read_text())
             for p in ([s["image"]] if isinstance(s.get("image"), str) else s.get("image") or [])}
    distinct = {vc.image_key(data / p) for p in files}
    # Two backbones x two stages x 2 steps, and every image went through the tower exactly once.
    assert sum(seen) == len(distinct) > 0
    assert len(list((out / "vision_cache").rglob("*.bfv"))) == len(distinct)
    for b in ("llama1-tiny", "llama3-tiny"):
        assert (out / b / "export" / "barnfast.json").exists()
        assert len((out / b / "metrics.jsonl").read_text().splitlines()) == 4
