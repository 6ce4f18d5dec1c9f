"""Faults of long jobs: SIGKILL and exact resume, a crash while saving, SIGTERM, non-finite steps, OOM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from barnfast.models.vlm import LlavaVLM
from barnfast.train import main
from barnfast.training import checkpoint
from barnfast.training.trainer import MicroBatchOOMError, NonFiniteError

ARGS = ["--backbone", "llama1-tiny", "--no-progress", "--checkpoint-every", "2",
        "--set", "data.synthetic_stage1=96", "--set", "data.synthetic_stage2=64", "--set", "data.synthetic_eval=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(out: Path, data: Path) -> list[str]:
    return ["--output-dir", str(out), "--set", f'data.synthetic_dir="{data}"', *ARGS]


def _losses(out: Path) -> list[tuple[str, int, float, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: 6 stage-1 steps, 8 stage-2 steps."""
    root = tmp_path_factory.mktemp("ref")
    _run(root / "run", root / "data")
    return root / "run", root / "data"


def _run(out: Path, data: Path, *extra: str) -> None:
    """A whole run in a subprocess: every run of this file uses the same thread count, so results compare bitwise."""
    res = subprocess.run([sys.executable, "-m", "barnfast.train", *_args(out, data), *extra], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _start(out: Path, data: Path, wrapper: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "barnfast.train"]
    return subprocess.Popen([*cmd, *_args(out, data)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    raise TimeoutError(f"{metrics} never reached {n} lines")


def test_sigkill_then_resume_gives_identical_losses(reference, tmp_path):
    ref, data = reference
    out = tmp_path / "run"
    kill_after = 3 + int.from_bytes(os.urandom(1), "little") % 8  # a random step in stage 1 or 2
    proc = _start(out, data)
    _wait_for_lines(out, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _run(out, data, "--resume")
    assert _losses(out) == _losses(ref), f"killed after {kill_after} logged steps"  # bitwise on CPU


def test_crash_while_saving_keeps_previous_checkpoint(reference, tmp_path):
    ref, data = reference
    out = tmp_path / "run"
    # Die inside the second save, after its files were written but before they became the checkpoint.
    wrapper = (
        "import os, sys, barnfast.training.checkpoint as c\n"
        "real, calls = c._finalize, []\n"
        "def dying(*a):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2: os._exit(137)\n"
        "    return real(*a)\n"
        "c._finalize = dying\n"
        "from barnfast.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = _start(out, data, wrapper)
    proc.wait(timeout=300)
    assert proc.returncode == 137
    root = out / "checkpoints"
    assert checkpoint.latest_checkpoint(root).name == "stage1-step000002"
    assert list(root.glob(".tmp-stage1-step000004"))  # the half-finished save is there, and ignored
    _run(out, data, "--resume")
    assert not list(root.glob(".tmp-*"))
    assert _losses(out) == _losses(ref)


def test_sigterm_saves_a_checkpoint_and_exits(reference, tmp_path):
    ref, data = reference
    out = tmp_path / "run"
    proc = _start(out, data)
    _wait_for_lines(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 143, proc.stderr.read().decode()[-2000:]
    state = checkpoint.read_state(checkpoint.latest_checkpoint(out / "checkpoints"))
    logged = _losses(out)
    assert (state.stage, state.step) == (logged[-1][0], logged[-1][1] + 1)  # saved right after the last step
    _run(out, data, "--resume")
    assert _losses(out) == _losses(ref)


def test_nonfinite_steps_are_skipped_then_the_run_stops(reference, tmp_path, monkeypatch):
    _, data = reference
    out = tmp_path / "run"
    real = LlavaVLM.forward
    calls = {"n": 0}

    def flaky(self, batch, num_target_tokens=None):
        calls["n"] += 1
        loss = real(self, batch, num_target_tokens)
        return loss * float("nan") if calls["n"] in (2, 3) or calls["n"] >= 8 else loss

    monkeypatch.setattr(LlavaVLM, "forward", flaky)
    with pytest.raises(NonFiniteError, match="in a row"):
        main([*_args(out, data), "--set", "train.max_nonfinite_in_a_row=2"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["skipped"]]
    assert [r["skipped"] for r in rows[:4]] == [False, True, True, False]
    log = [json.loads(x) for x in (out / "nonfinite_steps.jsonl").read_text().splitlines()]
    assert len(log) == len(skipped) and all(len(x["sample_ids"]) == 16 for x in log[:2])
    state = checkpoint.read_state(checkpoint.latest_checkpoint(out / "checkpoints"))
    assert state.nonfinite_in_a_row == 3


def test_out_of_memory_names_the_token_budget(reference, tmp_path, monkeypatch):
    _, data = reference

    def oom(self, batch, num_target_tokens=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(LlavaVLM, "forward", oom)
    with pytest.raises(MicroBatchOOMError, match=r"token_budget=1024.*--token-budget 512"):
        main(_args(tmp_path / "run", data))


def test_lora_resume_is_bit_identical(tmp_path):
    """LoRA dropout draws from the global torch RNG: the DataLoader iterator created after a resume must not
    draw from it (it has its own generator), or the resumed steps' dropout masks differ."""
    out, data = tmp_path / "run", tmp_path / "data"
    argv = ["--output-dir", str(out), "--set", f'data.synthetic_dir="{data}"', "--backbone", "llama1-tiny",
            "--no-progress", "--stages", "stage2", "--max-steps", "3", "--checkpoint-every", "1",
            "--set", "data.synthetic_stage1=16", "--set", "data.synthetic_stage2=32", "--set", "data.synthetic_eval=4",
            "--set", "lora.enabled=true", "--set", "lora.dropout=0.5", "--set", "train.keep_checkpoints=3"]
    assert main(argv) == 0
    ref = _losses(out)
    assert len(ref) == 3
    (out / "checkpoints" / "latest").write_text("stage2-step000001\n")  # as if killed after step 1
    assert main([*argv, "--resume"]) == 0
    assert _losses(out) == ref
