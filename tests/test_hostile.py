"""Hostile but fair input through the CLI: planted pickles, corrupted checkpoints, data that leaves its folder,
broken records and images that fail to decode only inside the DataLoader."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from barnfast.data.dataset import TooManySkippedError
from barnfast.data.synthetic import ensure_synthetic
from barnfast.train import main
from barnfast.training import checkpoint
from barnfast.training.checkpoint import CheckpointError

TINY = ["--backbone", "llama1-tiny", "--no-progress", "--set", "data.synthetic_stage1=32",
        "--set", "data.synthetic_stage2=16", "--set", "data.synthetic_eval=4"]


def _argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--set", f'data.synthetic_dir="{data}"', *TINY, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1, two steps, a checkpoint after each (step 1 is mid-stage: resuming it restores the RNG files)."""
    root = tmp_path_factory.mktemp("trained")
    out, data = root / "run", root / "data"
    assert main(_argv(out, data, "--stages", "stage1", "--max-steps", "2", "--checkpoint-every", "1")) == 0
    return out, data


def _copy_run(trained, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained run whose ``latest`` names the mid-stage checkpoint (step 1)."""
    out, data = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("export", ".lock"))
    (copy / "checkpoints" / "latest").write_text("stage1-step000001\n")
    return copy, data


class _Planted:
    """Unpickling this creates ``marker``: what an attacker's rng_rank0.pt would do (any code could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _plant(path: Path, marker: Path) -> None:
    torch.save({"python": _Planted(marker), "torch": torch.get_rng_state()}, path)


def test_planted_pickle_in_the_rng_file_does_not_run_on_resume(trained, tmp_path):
    out, data = _copy_run(trained, tmp_path)
    ckpt = out / "checkpoints" / "stage1-step000001"
    # The payload is live: an unrestricted torch.load of it runs the code.
    live, live_marker = tmp_path / "live.pt", tmp_path / "ran-live"
    _plant(live, live_marker)
    torch.load(live, weights_only=False)
    assert live_marker.exists()

    marker = tmp_path / "ran-on-resume"
    _plant(ckpt / "rng_rank0.pt", marker)
    resume = _argv(out, data, "--stages", "stage1", "--max-steps", "2", "--resume")
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt (has \d+ bytes|does not match)"):
        main(resume)
    assert not marker.exists()

    # An attacker who also rewrites the manifest gets the file read, with weights_only=True: refused, not run.
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["files"]["rng_rank0.pt"] = {"sha256": checkpoint._sha256(ckpt / "rng_rank0.pt"),
                                         "bytes": (ckpt / "rng_rank0.pt").stat().st_size}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: refused to load"):
        main(resume)
    assert not marker.exists()


def test_barnfast_writes_no_pickled_values(trained):
    """Every file barnfast writes into a checkpoint loads with weights_only=True or is JSON; the DCP payload
    holds tensors only (torch's reader would unpickle any non-tensor entry with weights_only=False)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out, _ = trained
    for ckpt in (out / "checkpoints").glob("stage1-step*"):
        torch.load(ckpt / "rng_rank0.pt", weights_only=True)
        for name in ("trainer_state.json", "optimizer_extra.json", "MANIFEST.json"):
            json.loads((ckpt / name).read_text())
        meta = FileSystemReader(str(ckpt)).read_metadata()
        pickled = [k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        assert pickled == [], pickled


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_shard_is_refused_naming_the_file(trained, tmp_path, damage):
    out, data = _copy_run(trained, tmp_path)
    shard = out / "checkpoints" / "stage1-step000001" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    assert len(raw) > 3 * 4096
    if damage == "flip":
        mid = len(raw) // 2
        raw[mid:mid + 4096] = bytes(b ^ 0xFF for b in raw[mid:mid + 4096])  # 4 KB of flipped bytes
        match = r"__0_0\.distcp does not match its sha256"
    else:
        raw = raw[:len(raw) - 4096]
        match = rf"__0_0\.distcp has {len(raw)} bytes, the manifest says {len(raw) + 4096}"
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=match):
        main(_argv(out, data, "--stages", "stage1", "--max-steps", "2", "--resume"))


# -- data as data ------------------------------------------------------------------------------------------
def _corrupt_png(src: Path, dst: Path) -> None:
    """A PNG whose chunk CRCs are all valid but whose compressed pixel data is garbage: ``verify()`` passes
    (it checks chunks and CRCs), decoding the pixels fails."""
    raw = src.read_bytes()
    out, pos = bytearray(raw[:8]), 8
    while pos < len(raw):
        (length,), kind = struct.unpack(">I", raw[pos:pos + 4]), raw[pos + 4:pos + 8]
        body = raw[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = b"\x78\x9c" + bytes((i * 37 + 11) % 256 for i in range(len(body) - 2))  # zlib header, garbage
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    dst.write_bytes(bytes(out))


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory):
    """A stage-1 JSONL: 31 good captions, one whose PNG only fails when decoded, and six bad records."""
    root = tmp_path_factory.mktemp("hostile")
    syn = root / "syn"
    ensure_synthetic(syn, num_stage1=32, num_stage2=4, num_eval=2, seed=0)
    good = json.loads((syn / "stage1.json").read_text())
    images = root / "images"
    shutil.copytree(syn / "images", images)
    _corrupt_png(images / Path(good[5]["image"]).name, images / "corrupt.png")
    with Image.open(images / "corrupt.png") as im:
        im.verify()  # passes: the encode-time check cannot see it
    with pytest.raises(OSError), Image.open(images / "corrupt.png") as im:
        im.load()
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(images / Path(good[0]["image"]).name, outside / "x.png")
    os.symlink(outside / "x.png", images / "link-out.png")
    conv = good[0]["conversations"]
    records = [{**r, "image": Path(r["image"]).name} for r in good[:31]]
    records.append({"id": "decode-fails", "image": "corrupt.png", "conversations": conv})
    lines = [json.dumps(r) for r in records]
    lines += [json.dumps({"id": "dotdot", "image": "../outside/x.png", "conversations": conv}),
              json.dumps({"id": "absolute", "image": str(outside / "x.png"), "conversations": conv}),
              json.dumps({"id": "symlink", "image": "link-out.png", "conversations": conv}),
              json.dumps({**records[3], "conversations": conv}),  # a second record with records[3]'s id
              '{"id": "broken", "image": ',  # one bad JSONL line
              ]
    path = root / "stage1.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"id": "latin1", "conversations": "\xe9t\xe9"}\n')
    return path, images, records[3]["id"]


def _hostile_argv(out: Path, hostile_data, *extra: str) -> list[str]:
    path, images, _ = hostile_data
    return ["--backbone", "llama1-tiny", "--no-progress", "--output-dir", str(out), "--stages", "stage1",
            "--data-stage1", str(path), "--image-root", str(images), "--set", "data.num_workers=1",
            "--set", "stages.epochs=2", "--checkpoint-every", "2", "--set", "train.keep_checkpoints=3", *extra]


def _skipped(out: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (out / "stage1" / "skipped_samples.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"listed twice: {ids}"
    return {r["id"]: r for r in rows}


def test_hostile_records_are_skipped_listed_and_decode_failures_survive_resume(hostile_data, tmp_path):
    out = tmp_path / "run"
    path, images, dup = hostile_data
    # 32 usable + 6 bad records at encode time, 1 decode failure in the loader: 7 of 38 (18.4%).
    assert main(_hostile_argv(out, hostile_data, "--max-skip-fraction", "0.25")) == 0
    skipped = _skipped(out)
    assert set(skipped) == {"dotdot", "absolute", "symlink", dup, "stage1.jsonl:line 37", "stage1.jsonl:line 38",
                            "decode-fails"}, skipped
    for sid in ("dotdot", "symlink"):
        assert "leaves the image root" in skipped[sid]["reason"]
    assert "is absolute" in skipped["absolute"]["reason"]
    assert "duplicate id" in skipped[dup]["reason"] and "is kept" in skipped[dup]["reason"]
    assert "line 37 is not valid JSON" in skipped["stage1.jsonl:line 37"]["reason"]
    assert "line 38 is not UTF-8" in skipped["stage1.jsonl:line 38"]["reason"]
    bad = skipped["decode-fails"]
    assert bad["where"] == "loader" and "corrupt.png" in bad["reason"] and bad["step"] < 2  # met in epoch 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # two epochs of 32 samples, 16 per step
    assert all(r["loss"] == r["loss"] for r in rows)  # the zeroed sample adds no NaN

    # Resume from the end of epoch 0: epoch 1 meets the sample again; skipped again, listed once, no crash.
    (out / "checkpoints" / "latest").write_text("stage1-step000002\n")
    assert main(_hostile_argv(out, hostile_data, "--max-skip-fraction", "0.25", "--resume")) == 0
    assert _skipped(out)["decode-fails"] == bad
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]


def test_decode_failures_count_against_the_skip_limit(hostile_data, tmp_path):
    out = tmp_path / "run"
    # 6 of 38 (15.8%) pass a 17% limit at encode time; the loader's decode failure makes it 18.4%.
    with pytest.raises(TooManySkippedError, match=r"7 of 38 samples .*1 of them because an image failed to decode"):
        main(_hostile_argv(out, hostile_data, "--max-skip-fraction", "0.17"))
    assert "decode-fails" in _skipped(out)


def test_outside_paths_are_read_when_the_recipe_allows_it(hostile_data, tmp_path):
    out = tmp_path / "run"
    assert main(_hostile_argv(out, hostile_data, "--max-skip-fraction", "0.25", "--max-steps", "1",
                              "--set", "data.allow_outside_image_root=true")) == 0
    assert not {"dotdot", "absolute", "symlink"} & set(_skipped(out))


def test_vision_cache_precompute_skips_an_image_that_fails_to_decode(hostile_data, tmp_path):
    out = tmp_path / "run"
    assert main(_hostile_argv(out, hostile_data, "--max-skip-fraction", "0.25", "--max-steps", "2",
                              "--set", "stages.epochs=1", "--vision-cache", str(tmp_path / "cache"))) == 0
    assert _skipped(out)["decode-fails"]["where"] == "loader"
