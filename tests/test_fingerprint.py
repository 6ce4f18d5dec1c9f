"""A run is its fingerprint: what goes into it, and a resume under another one stops before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from barnfast.config import load_recipe
from barnfast.data import vision_cache as vc
from barnfast.models import backbones, vision
from barnfast.train import main
from barnfast.training import fingerprint as fp_lib

SMALL = ["--no-progress", "--stages", "stage1", "--max-steps", "1", "--set", "data.synthetic_stage1=16",
         "--set", "data.synthetic_stage2=8", "--set", "data.synthetic_eval=4"]


@pytest.fixture(autouse=True)
def _hash_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("BARNFAST_HASH_CACHE", str(tmp_path / "hashes.json"))


def _fp(tmp_path: Path, overrides: dict | None = None, data: bytes = b'[{"id": "a"}]', **kw) -> fp_lib.Fingerprint:
    recipe = load_recipe("llava15-tiny", {"model.backbone": "llama1-tiny", "output_dir": str(tmp_path / "out"),
                                          **(overrides or {})})
    f = tmp_path / "stage.json"
    if not f.exists() or f.read_bytes() != data:
        f.write_bytes(data)
    files = {s.name: (f, tmp_path, True) for s in recipe.stages}
    return fp_lib.compute(recipe, backbone=backbones.from_name(recipe.model.backbone),
                          vision=vision.from_name("clip-l-336-tiny"), stage_files=files, **kw)


def test_fields_that_do_not_define_the_run_leave_the_fingerprint_alone(tmp_path):
    base = _fp(tmp_path)
    same = _fp(tmp_path, {"output_dir": "elsewhere", "train.checkpoint_every": 5, "train.log_every": 3,
                          "data.num_workers": 2, "data.max_skip_fraction": 0.5, "train.keep_checkpoints": 4})
    assert same.digest == base.digest
    assert "output_dir" not in base.fields and base.fields["barnfast.version"]


@pytest.mark.parametrize("override, field", [
    ({"train.seed": 7}, "train.seed"),
    ({"stage2.lr": 5e-3}, "stages[stage2].lr"),
    ({"model.backbone": "llama2-tiny"}, "model.backbone"),
    ({"data.vision_cache": "/some/cache"}, "data.vision_cache"),  # cached fp16 features vs fp32: not the same run
    ({"data.max_length": 1024}, "data.max_length"),
    ({"stages.global_batch": 8}, "stages[stage1].global_batch"),
])
def test_fields_that_define_the_run_change_it_and_are_listed(tmp_path, override, field):
    base, other = _fp(tmp_path), _fp(tmp_path, override)
    assert other.digest != base.digest
    assert field in [k for k, _, _ in fp_lib.differences(base.fields, other.fields)]


def test_data_content_is_in_the_fingerprint_not_its_path(tmp_path):
    a = _fp(tmp_path)
    b = _fp(tmp_path, data=b'[{"id": "b"}]')  # same path, other bytes
    diffs = {k for k, _, _ in fp_lib.differences(a.fields, b.fields)}
    assert diffs == {"data.stage1.file_sha256", "data.stage2.file_sha256"}
    excl = tmp_path / "excl.jsonl"
    excl.write_text('{"stage": "stage1", "id": "a", "reason": "long"}\n')
    assert "data.exclude_samples_sha256" in _fp(tmp_path, exclude_file=excl).fields


def test_weights_identity_follows_the_bytes_at_a_path(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 32}')
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\0" * 4096)
    first = fp_lib.weights_identity(folder)
    assert fp_lib.weights_identity(folder) == first  # memoised by (path, size, mtime)
    weights.write_bytes(b"\1" * 4096)  # replaced in place: same path, same size
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fp_lib.weights_identity(folder) != first
    # The vision cache keys by the same content, never the path.
    tower = vision.from_name("clip-tiny")
    spec = tower.image_spec("pad")
    s1 = vc.settings_for(tower, s2_scales=(1,), image_aspect="pad", dtype="fp16", seed=0, vision_path=str(folder),
                         image_spec=spec)
    weights.write_bytes(b"\2" * 4096)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
    s2 = vc.settings_for(tower, s2_scales=(1,), image_aspect="pad", dtype="fp16", seed=0, vision_path=str(folder),
                         image_spec=spec)
    assert s1.digest() != s2.digest() and str(folder) not in s1.weights
    s3 = vc.settings_for(tower, s2_scales=(1,), image_aspect="pad", dtype="fp16", seed=0, vision_path=str(folder),
                         image_spec=tower.image_spec("pad", size=112))
    assert s3.digest() != s2.digest()  # the preprocessing is in the key too


def test_resume_with_other_settings_stops_before_any_work_listing_each_field(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    args = ["--output-dir", str(out), "--set", f'data.synthetic_dir="{data}"', *SMALL]
    assert main(["--backbone", "llama1-tiny", *args]) == 0
    record = json.loads((out / "run.json").read_text())
    ckpt = sorted((out / "checkpoints").glob("stage1-*"))[-1]
    assert json.loads((ckpt / "trainer_state.json").read_text())["fingerprint"] == record["fingerprint"]
    manifest = json.loads((out / "stage1" / "manifest.json").read_text())
    assert manifest["num_steps"] == 1 and len(manifest["steps"][0]) == 16
    before = {p: p.read_bytes() for p in (out / "run.json", out / "metrics.jsonl")}
    with pytest.raises(fp_lib.FingerprintMismatchError) as err:
        main(["--backbone", "llama2-tiny", *args, "--resume", "--seed", "7", "--set", "stage1.lr=5e-3"])
    msg = str(err.value)
    for line in ("model.backbone: 'llama1-tiny' -> 'llama2-tiny'", "train.seed: 42 -> 7",
                 "stages[stage1].lr: 0.001 -> 0.005"):
        assert line in msg, msg
    # Nothing was touched: run.json is never overwritten by a different run, no step was logged.
    assert {p: p.read_bytes() for p in before} == before
    # A fresh (non-resume) run into the same folder with other settings is refused the same way.
    with pytest.raises(fp_lib.FingerprintMismatchError, match="train.seed"):
        main(["--backbone", "llama1-tiny", *args, "--seed", "3"])


def test_one_length_limit_for_every_backbone():
    from barnfast.errors import ConfigError
    from barnfast.training.trainer import check_max_length

    r = load_recipe("llava15-tiny", {"model.backbone": "llama3-tiny"})
    assert r.data.max_length == 2048  # LLaVA-1.5's model_max_length, not llama3's 8192
    check_max_length(r)
    with pytest.raises(ConfigError, match="data.max_length: 4096 is longer than the context of llama1-tiny"):
        check_max_length(load_recipe("llava15-tiny", {"model.backbone": "llama1-tiny", "data.max_length": 4096}))
    with pytest.raises(ConfigError, match="train.max_length: moved to data.max_length"):
        load_recipe("llava15-tiny", {"train.max_length": 1024})
