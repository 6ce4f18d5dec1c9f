"""--report-to tensorboard,wandb: the logged scalars read back from the TensorBoard event files and the
offline W&B run, equal to metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from barnfast.train import main

pytest.importorskip("tensorboard", reason="the tracking extra is not installed")


def test_tensorboard_events_and_offline_wandb_hold_the_logged_metrics(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = pytest.importorskip("wandb", reason="the tracking extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("BARNFAST_HASH_CACHE", str(tmp_path / "hashes.json"))
    out = tmp_path / "run"
    assert main(["--backbone", "llama1-tiny", "--output-dir", str(out), "--stages", "stage1", "--max-steps", "3",
                 "--no-progress", "--report-to", "tensorboard,wandb", "--set", "train.report_group=\"g1\"",
                 "--set", f'data.synthetic_dir="{tmp_path / "data"}"', "--set", "data.synthetic_stage1=48",
                 "--set", "data.synthetic_stage2=8", "--set", "data.synthetic_eval=4"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("stage1/loss")
    assert [e.step for e in loss] == [r["samples_seen"] for r in rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # stored as float32
    bpb = acc.Scalars("stage1/loss_bits_per_byte")
    assert [e.value for e in bpb] == pytest.approx([r["loss_bits_per_byte"] for r in rows], rel=1e-6)
    (record,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # the offline run, for `wandb sync`
    raw = record.read_bytes()
    # The transaction log holds each history item as (key, JSON value) strings, the run's group and config.
    assert raw.startswith(b":W&B") and raw.count(b"stage1/loss") >= 3
    for r in rows:
        assert json.dumps(r["loss"]).encode() in raw and json.dumps(r["lr"]).encode() in raw
    assert b"g1" in raw and b"llama1-tiny" in raw
    assert wandb.run is None  # finished when the run closed
