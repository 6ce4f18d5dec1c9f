"""barnfast.sweep end to end on two -tiny backbones, interrupted after the first and started again."""

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from barnfast import sweep

BACKBONES = ("llama1-tiny", "llama3-tiny")
ARGS = ["--max-steps", "2", "--stage1-samples", "32", "--stage2-samples", "24", "--eval-samples", "8",
        "--stability-items", "4", "--max-new-tokens", "4", "--no-progress"]


@functools.cache
def finished_sweep() -> tuple[Path, dict]:
    """A sweep killed once the first backbone is exported, then started again to the end.

    Returns (sweep dir, facts about the interruption), shared by this module and test_analyze/test_eval.
    """
    out = Path(tempfile.mkdtemp(prefix="barnfast-sweep-")) / "sweep"
    argv = ["--backbones", ",".join(BACKBONES), "--output-dir", str(out), *ARGS]
    first = out / BACKBONES[0]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "barnfast.sweep", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    try:
        while not sweep.is_finished(first):
            if proc.poll() is not None:
                raise AssertionError(f"sweep exited early ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("first backbone did not finish within 400 s")
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)  # a hard interruption: no handler runs
        proc.wait()
    facts = {"killed_rc": proc.returncode, "first_finished_at_kill": sweep.is_finished(first),
             "second_finished_at_kill": sweep.is_finished(out / BACKBONES[1]),
             "first_metrics": (first / "metrics.jsonl").read_text(),
             "first_metrics_mtime": (first / "metrics.jsonl").stat().st_mtime_ns,
             "first_weights_mtime": (first / "export" / "model.safetensors").stat().st_mtime_ns}
    assert sweep.main(argv) == 0
    return out, facts


def test_sweep_resumes_after_interruption_without_retraining():
    out, facts = finished_sweep()
    assert facts["killed_rc"] == -signal.SIGKILL and facts["first_finished_at_kill"]
    assert not facts["second_finished_at_kill"]
    first = out / BACKBONES[0]
    # The finished run was not trained again: same metrics log, same weights file.
    assert (first / "metrics.jsonl").read_text() == facts["first_metrics"]
    assert (first / "metrics.jsonl").stat().st_mtime_ns == facts["first_metrics_mtime"]
    assert (first / "export" / "model.safetensors").stat().st_mtime_ns == facts["first_weights_mtime"]
    for b in BACKBONES:
        run = out / b
        assert sweep.is_finished(run)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["stage"], r["step"]) for r in rows] == [("stage1", 0), ("stage1", 1), ("stage2", 0), ("stage2", 1)]
        for task in ("open", "mc", "yesno"):
            recs = [json.loads(x) for x in (run / "eval" / f"eval_{task}.jsonl").read_text().splitlines()]
            assert len(recs) == 8 and {r["task"] for r in recs} == {task}
            fields = {"id", "category", "prediction", "correct", "confidence", "option_probs"}
            assert all(fields <= set(r) for r in recs)
        stab = json.loads((run / "eval" / "stability.json").read_text())
        assert stab["n_items"] == 4 and len(stab["cka"]["noise"]) == stab["num_layers"] + 1


def test_sweep_controls_everything_but_the_backbone():
    out, _ = finished_sweep()
    cfg = json.loads((out / "sweep.json").read_text())
    assert cfg["backbones"] == list(BACKBONES) and cfg["seed"] == 42
    runs = {b: json.loads((out / b / "run.json").read_text()) for b in BACKBONES}
    a, b = (r.get("config", r) for r in runs.values())
    flat_a, flat_b = json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True)
    for name in BACKBONES:  # the only differences: the backbone name and the run folder
        flat_a, flat_b = flat_a.replace(name, "B"), flat_b.replace(name, "B")
    assert flat_a == flat_b
    argv = [sweep.train_argv(cfg, name, out / name, True) for name in BACKBONES]
    assert [x.replace(BACKBONES[1], BACKBONES[0]) for x in argv[1]] == argv[0]


def test_sweep_refuses_a_different_config_on_the_same_folder():
    out, _ = finished_sweep()
    with pytest.raises(SystemExit, match="seed"):
        sweep.main(["--backbones", ",".join(BACKBONES), "--output-dir", str(out), "--seed", "7", *ARGS])


def test_unfinished_run_without_checkpoint_restarts_with_its_log_kept_aside(tmp_path, monkeypatch):
    run = tmp_path / "llama1-tiny"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    calls = []
    monkeypatch.setattr(sweep.train, "main", lambda argv: calls.append(argv) or 0)
    cfg = sweep.sweep_config(sweep.parse_args(["--backbones", "llama1-tiny", "--output-dir", str(tmp_path)]))
    assert sweep.train_one(cfg, "llama1-tiny", run, 0, True) == 0
    assert "--resume" not in calls[0] and not (run / "metrics.jsonl").exists()
    assert (run / "metrics.interrupted-0.jsonl").read_text() == '{"step": 0}\n'
    assert sweep.train_supports_resume()  # barnfast.train has --resume: runs with a checkpoint continue
