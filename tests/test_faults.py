"""Faults of long jobs met through the CLI: SIGTERM to the process group with DataLoader workers, a full disk
during a save, two runs on one folder, restarts that must not duplicate logs, a deleted ``latest``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from barnfast import sweep
from barnfast.train import main
from barnfast.training import checkpoint, distributed
from barnfast.training.lock import OutputDirLock, OutputDirLockedError

TINY = ["--backbone", "llama1-tiny", "--no-progress", "--stages", "stage1", "--set", "data.synthetic_stage1=32",
        "--set", "data.synthetic_stage2=16", "--set", "data.synthetic_eval=4"]
CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))


def _argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--set", f'data.synthetic_dir="{data}"', *TINY, *extra]


def _metrics(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_143(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    # What SLURM does: SIGTERM to every process of the job, DataLoader workers included.
    proc = subprocess.Popen([sys.executable, "-m", "barnfast.train", *_argv(out, data, "--set", "data.num_workers=2",
                                                                            "--set", "data.synthetic_stage1=96")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no step was logged"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 143, err[-3000:]
    assert "killed by signal" not in err
    state = checkpoint.read_state(checkpoint.latest_checkpoint(out / "checkpoints"))
    assert state.stage == "stage1" and not state.stage_done and state.step == len(_metrics(out))


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out, data = tmp_path / "run", tmp_path / "data"
    real, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("rng_rank0.pt"):  # DCP writes its tensors with torch.save too
            calls.append(f)
        if len(calls) == 2:  # the second checkpoint's write hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointDiskFullError, match=r"disk full while saving checkpoint "
                       r"stage1-step000002 .*partial folder \.tmp-stage1-step000002 was removed.*"
                       r"previous checkpoint stage1-step000001 is intact"):
        main(_argv(out, data, "--max-steps", "3", "--checkpoint-every", "1"))
    root = out / "checkpoints"
    assert not list(root.glob(".tmp-*"))
    latest = checkpoint.latest_checkpoint(root)
    assert latest.name == "stage1-step000001"
    checkpoint.verify_checkpoint(latest, CPU)  # intact, every file matches its checksum


def test_a_second_run_on_one_output_folder_is_refused(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    holder = OutputDirLock(out, "barnfast train").acquire()  # another open file description: flock conflicts
    try:
        with pytest.raises(OutputDirLockedError, match=rf"in use by another process \(pid {os.getpid()}, barnfast"):
            main(_argv(out, data, "--max-steps", "1"))
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
        sweep_out = tmp_path / "sweep"
        with OutputDirLock(sweep_out, "barnfast sweep"):
            with pytest.raises(OutputDirLockedError, match="barnfast sweep"):
                sweep.main(["--backbones", "llama1-tiny", "--output-dir", str(sweep_out), "--no-eval",
                            "--max-steps", "1", "--stage1-samples", "16", "--stage2-samples", "16"])
    finally:
        holder.release()
    with OutputDirLock(out):  # released: free again
        pass


def test_logs_are_never_duplicated_and_a_missing_latest_is_rebuilt(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    argv = _argv(out, data, "--max-steps", "2", "--checkpoint-every", "1")
    assert main(argv) == 0
    ref = _metrics(out)
    assert [s for s, _ in ref] == [0, 1]
    root = out / "checkpoints"
    # `latest` deleted, and the end-of-stage checkpoint with it: resume continues from the newest complete one.
    (root / "latest").unlink()
    shutil.rmtree(root / "stage1-step000002")
    (root / ".tmp-stage1-step000002").mkdir()  # an incomplete save is never picked
    with open(out / "nonfinite_steps.jsonl", "w") as f:
        for step in (0, 1):
            f.write(json.dumps({"stage": "stage1", "step": step, "loss": None, "sample_ids": []}) + "\n")
        f.write('{"stage": "stage1", "st')  # torn last line of a killed run
    with pytest.warns(UserWarning, match=r"latest is missing; rebuilt it .* stage1-step000001"):
        assert main([*argv, "--resume"]) == 0
    assert (root / "latest").read_text().strip() == "stage1-step000002"
    assert _metrics(out) == ref  # step 1 again, logged once, bit-identical
    kept = [json.loads(x) for x in (out / "nonfinite_steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [0]  # step 1's row belonged to the re-run step

    # A restart without any checkpoint (and without --resume): from scratch, the old rows are replaced.
    shutil.rmtree(root)
    assert main(argv) == 0
    assert _metrics(out) == ref
    assert (out / "nonfinite_steps.jsonl").read_text() == ""


def _two_rank_checkpoint(rank: int, world: int, root: str, port: int) -> None:
    """One gloo rank: save, load back, then load again after rank 0 damaged a file that rank 1 checks."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = distributed.DistInfo(rank, world, 0, torch.device("cpu"))
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, 8)).square().sum().backward()
        opt.step()
        path = checkpoint.save_checkpoint(root, model, opt, checkpoint.TrainerState("stage1", 1, False, 4), info)
        other = torch.nn.Linear(8, 8)
        other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
        checkpoint.load_checkpoint(path, other, other_opt, info)
        assert torch.equal(other.weight, model.weight)
        names = sorted(json.loads((path / "MANIFEST.json").read_text())["files"])
        dist.barrier()
        if rank == 0:  # a file of rank 1's share (each rank checks every world_size-th name)
            target = path / names[1]
            target.write_bytes(bytes(b ^ 0xFF for b in target.read_bytes()))
        dist.barrier()
        try:
            checkpoint.load_checkpoint(path, other, other_opt, info)
            message = "loaded"
        except checkpoint.CheckpointError as exc:
            message = str(exc)
        Path(root, f"rank{rank}.txt").write_text(f"{names[1]}\n{message}")
    finally:
        dist.destroy_process_group()


def test_checksums_are_written_and_checked_by_all_ranks_together(tmp_path):
    """Two gloo ranks share the hashing and the check; a damaged file makes every rank raise (none hangs)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_checkpoint, args=(2, str(tmp_path), port), nprocs=2, join=True)
    name, rank0 = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    _, rank1 = (tmp_path / "rank1.txt").read_text().split("\n", 1)
    assert f"{name} does not match its sha256" in rank1 or f"{name} has" in rank1, rank1
    assert "checked by another rank" in rank0, rank0
