"""End-to-end training on the tiny backbones: both stages, outputs, bad input, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from barnfast.data.dataset import StageDataset, TooManySkippedError
from barnfast.data.llava import Sample
from barnfast.models import backbones, vision
from barnfast.models.vlm import add_image_token
from barnfast.train import main
from barnfast.training.trainer import lr_at

SMALL = ["--set", "data.synthetic_stage1=96", "--set", "data.synthetic_stage2=64", "--set", "data.synthetic_eval=4",
         "--no-progress"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone", ["llama1-tiny", "llama3-tiny"])
def test_two_stages_train_and_export(tmp_path, backbone):
    out = tmp_path / "run"
    assert main(["--backbone", backbone, "--output-dir", str(out), *SMALL]) == 0
    rows = _metrics(out)
    s1 = [r for r in rows if r["stage"] == "stage1"]
    s2 = [r for r in rows if r["stage"] == "stage2"]
    assert len(s1) == 96 // 16 and len(s2) == 4 * 64 // 8  # global batch in samples; the tiny stage 2 runs 4 epochs
    for key in ("step", "stage", "loss", "lr", "grad_norm", "tokens_per_s", "samples_seen", "padding_efficiency"):
        assert key in s1[0]
    assert s1[-1]["samples_seen"] == 96 and s2[-1]["samples_seen"] == 96 + 4 * 64
    assert s1[-1]["loss"] < s1[0]["loss"] - 0.02, [r["loss"] for r in s1]  # projector learns at lr 1e-3
    assert s1[0]["padding_efficiency"] == 1.0
    assert [r["lr"] for r in s2] == [lr_at(i, len(s2), 1e-3, 0.0) for i in range(len(s2))]  # the tiny recipe
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["model"]["backbone"] == backbone and record["versions"]["torch"] == torch.__version__
    assert "git_revision" in record
    for stage, steps in (("stage1", len(s1)), ("stage2", len(s2))):
        assert (out / stage / "skipped_samples.jsonl").exists()
        assert (out / "checkpoints" / f"{stage}-step{steps:06d}" / "COMPLETE").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"stage2-step{len(s2):06d}"
    hf = LlavaForConditionalGeneration.from_pretrained(out / "export")
    tok = AutoTokenizer.from_pretrained(out / "export")
    assert tok.convert_tokens_to_ids("<image>") == hf.config.image_token_id
    assert hf.config.vision_feature_layer == -2
    meta = json.loads((out / "export" / "barnfast.json").read_text())
    assert meta["backbone"] == backbone and meta["image_token_id"] == hf.config.image_token_id


def test_stage1_trains_projector_only(tmp_path):
    out = tmp_path / "run"
    main(["--backbone", "llama1-tiny", "--output-dir", str(out), "--stages", "stage1", "--max-steps", "2", *SMALL])
    meta = FileSystemReader(out / "checkpoints" / "stage1-step000002").read_metadata()
    saved = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert saved and all(k.startswith("model.hf.model.multi_modal_projector.") for k in saved), saved


def test_unknown_backbone_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="llama3-tiny"):
        main(["--backbone", "llama9", "--output-dir", str(tmp_path)])


# -- bad input --------------------------------------------------------------------------------
@pytest.fixture
def bad_data(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    samples = [Sample(f"good{i}", ["ok.png"], good) for i in range(6)] + [
        Sample("missing", ["nope.png"], good),
        Sample("corrupt", ["corrupt.png"], good),
        Sample("no_answer", ["ok.png"], [{"from": "human", "value": "<image>\nHi"}]),
        Sample("too_long", ["ok.png"], [good[0], {"from": "gpt", "value": "red " * 400}]),
        Sample("placeholders", ["ok.png", "ok.png"], good),
        Sample("malformed", ["ok.png"], [], error="'conversations' must be a list, got str"),
    ]
    bb = backbones.from_name("llama1-tiny")
    tok = bb.load_tokenizer()
    return samples, tok, add_image_token(tok), tmp_path


def _dataset(bad_data, max_skip_fraction):
    samples, tok, image_id, root = bad_data
    return StageDataset(samples, tokenizer=tok, template="vicuna_v1", image_token_id=image_id,
                        image_spec=vision.from_name("clip-tiny").image_spec(),
                        num_image_tokens=vision.from_name("clip-tiny").num_tokens, image_root=root, max_length=256,
                        max_skip_fraction=max_skip_fraction, skipped_path=root / "skipped.jsonl",
                        show_progress=False)


def test_bad_samples_are_skipped_counted_and_named(bad_data):
    ds = _dataset(bad_data, max_skip_fraction=0.5)
    assert len(ds) == 6
    reasons = {json.loads(x)["id"]: json.loads(x)["reason"] for x in (bad_data[3] / "skipped.jsonl").open()}
    assert set(reasons) == {"missing", "corrupt", "no_answer", "too_long", "placeholders", "malformed"}
    assert "not found" in reasons["missing"] and "corrupt" in reasons["corrupt"]
    assert "no gpt turn" in reasons["no_answer"] and "context" in reasons["too_long"]
    assert "placeholder" in reasons["placeholders"]
    assert ds.packed([0, 1]).pixel_values.shape[0] == 2


def test_too_many_bad_samples_fail_the_run(bad_data):
    with pytest.raises(TooManySkippedError, match="6 of 12 samples"):
        _dataset(bad_data, max_skip_fraction=0.01)
    assert (bad_data[3] / "skipped.jsonl").read_text().count("\n") == 6  # written before failing


def test_bad_recipe_value_fails_before_work(tmp_path):
    from barnfast.errors import ConfigError

    with pytest.raises(ConfigError, match="train.token_budget"):
        main(["--backbone", "llama1-tiny", "--output-dir", str(tmp_path / "x"), "--token-budget", "2"])
    assert not (tmp_path / "x").exists()


# -- two processes ----------------------------------------------------------------------------
def _run(out: Path, nproc: int, data: Path, *extra: str):
    args = ["--backbone", "llama3-tiny", "--output-dir", str(out), "--max-steps", "3", "--set",
            f'data.synthetic_dir="{data}"', "--set", "stages.global_batch=8", "--set", "train.token_budget=128",
            *SMALL, *extra]
    cmd = [sys.executable, "-m", "barnfast.train", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "barnfast.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return _metrics(out)


def test_two_processes_match_one(tmp_path):
    """Same global batch on 1 and 2 gloo ranks: the same loss curve (fp32, summation order aside)."""
    data = tmp_path / "data"
    one = _run(tmp_path / "one", 1, data)
    two = _run(tmp_path / "two", 2, data)
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert a["stage"] == b["stage"] and a["samples_seen"] == b["samples_seen"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["micro_batches"] >= 1
    assert any(r["micro_batches"] > 1 for r in one)  # the small budget forces accumulation


def test_no_packing_trains_padded_and_logs_the_padding(tmp_path):
    out = tmp_path / "run"
    assert main(["--backbone", "llama1-tiny", "--output-dir", str(out), "--no-packing", "--max-steps", "2",
                 "--set", "train.micro_batch_size=4", *SMALL]) == 0
    rows = _metrics(out)
    assert [(r["stage"], r["micro_batches"]) for r in rows] == [("stage1", 4)] * 2 + [("stage2", 2)] * 2
    assert all(0 < r["padding_efficiency"] < 1 for r in rows)  # padded to the longest of each micro-batch
