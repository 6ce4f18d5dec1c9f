"""barnfast.sweep end to end on two -tiny backbones, interrupted after the first and started again."""

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from barnfast import sweep, train

BACKBONES = ("llama1-tiny", "llama3-tiny")
ARGS = ["--max-steps", "2", "--stage1-samples", "32", "--stage2-samples", "24", "--eval-samples", "8",
        "--stability-items", "4", "--max-new-tokens", "4", "--no-progress"]


def _scratch(prefix: str) -> Path:
    """A temporary folder shared by the modules that use it (so not pytest's per-test tmp_path), removed
    when the test process exits: each sweep here writes ~650 MB."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def finished_sweep() -> tuple[Path, dict]:
    """A sweep killed once the first backbone is exported, then started again to the end.

    Returns (sweep dir, facts about the interruption), shared by this module and test_analyze/test_eval.
    """
    out = _scratch("barnfast-sweep-") / "sweep"
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


# -- control: one sample set, fingerprints, your data and benchmarks, seeds ---------------------------------

LONG_ANSWER = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
# With 16 visual tokens and the tiny recipe's empty system text this sample is 343 tokens for llama1-tiny's
# tokenizer and 350 for llama3-tiny's: under a limit of 346 one backbone could take it and the other could not.
MAX_LENGTH = 346


def _user_files(root: Path) -> dict:
    """LLaVA JSON stage files with one long sample, a POPE question file and an MMBench TSV, made from a
    small synthetic set (so the images exist), in the layouts a user brings."""
    import base64

    from barnfast.data.synthetic import ensure_synthetic

    src = root / "src"
    ensure_synthetic(src, num_stage1=16, num_stage2=15, num_eval=6, seed=0)
    stage2 = json.loads((src / "stage2.json").read_text())
    stage2.append({"id": "long-one", "image": stage2[0]["image"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture in detail."}, {"from": "gpt", "value": LONG_ANSWER}]})
    (src / "mine_stage2.json").write_text(json.dumps(stage2))
    yesno = [json.loads(x) for x in (src / "eval_yesno.jsonl").read_text().splitlines()]
    pope = src / "pope" / "coco_pope_random.json"  # POPE: one JSON object per line, images under an image root
    pope.parent.mkdir()
    pope.write_text("".join(json.dumps({"question_id": i, "image": r["image"], "text": r["prompt"].split("\n")[0],
                                        "label": r["answer"]}) + "\n" for i, r in enumerate(yesno)))
    mc = [json.loads(x) for x in (src / "eval_mc.jsonl").read_text().splitlines()]
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    rows = [[i, r["prompt"].split("\n")[0], "nan", *[r["options"].get(k, "nan") for k in "ABCD"], r["answer"],
             r["category"], base64.b64encode((src / r["image"]).read_bytes()).decode(), "perception", "dev"]
            for i, r in enumerate(mc)]
    tsv = src / "MMBench_DEV_EN.tsv"
    tsv.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return {"src": src, "pope": pope, "tsv": tsv}


@functools.cache
def user_data_sweep() -> tuple[Path, list[str]]:
    """2 backbones × 2 seeds on user-given data (with a long sample) and user-given POPE / MMBench files."""
    root = _scratch("barnfast-usersweep-")
    f = _user_files(root)
    out = root / "sweep"
    argv = ["--backbones", ",".join(BACKBONES), "--seeds", "0,1", "--output-dir", str(out),
            "--data-stage1", str(f["src"] / "stage1.json"), "--data-stage2", str(f["src"] / "mine_stage2.json"),
            "--image-root", str(f["src"]), "--set", f"data.max_length={MAX_LENGTH}",
            "--eval", f"pope=pope:{f['pope']}:{f['src']}", "--eval", f"mmb=mmbench:{f['tsv']}:{root / 'mmb_images'}",
            "--max-steps", "1", "--stability-items", "0", "--no-progress"]
    assert sweep.main(argv) == 0
    return out, argv


def test_user_data_sweep_drops_a_sample_some_backbone_cannot_take_for_every_backbone():
    out, _ = user_data_sweep()
    (ex,) = [json.loads(x) for x in (out / sweep.EXCLUDED_FILE).read_text().splitlines()]
    assert (ex["stage"], ex["id"], ex["backbone"]) == ("stage2", "long-one", "llama3-tiny")
    assert f"over data.max_length={MAX_LENGTH}" in ex["reason"]
    for seed in (0, 1):
        manifests = [json.loads((out / f"{b}-seed{seed}" / "stage2" / "manifest.json").read_text())
                     for b in BACKBONES]
        assert manifests[0]["sha256"] == manifests[1]["sha256"] and manifests[0]["steps"] == manifests[1]["steps"]
        assert all(m["num_excluded"] == 1 and m["num_samples"] == 15 for m in manifests)
        assert "long-one" not in {i for step in manifests[0]["steps"] for i in step}
    seeds = [json.loads((out / f"llama1-tiny-seed{s}" / "stage1" / "manifest.json").read_text()) for s in (0, 1)]
    assert seeds[0]["sha256"] != seeds[1]["sha256"] or len(seeds[0]["steps"][0]) == 16  # one step holds all 16
    control = json.loads((out / "control.json").read_text())
    assert control["controlled"] is True and control["differences"] == []
    assert [e["id"] for e in control["excluded_samples"]] == ["long-one"]


def test_user_data_sweep_evaluates_the_given_benchmarks_and_reports_control_first():
    from barnfast.evaluation import analyze

    out, _ = user_data_sweep()
    for b in BACKBONES:
        run = out / f"{b}-seed0"
        pope = [json.loads(x) for x in (run / "eval" / "pope.jsonl").read_text().splitlines()]
        mmb = json.loads((run / "eval" / "mmb.summary.json").read_text())
        assert len(pope) == 6 and {r["task"] for r in pope} == {"yesno"}
        assert mmb["format"] == "mmbench" and mmb["benchmark"]["n_questions"] == 6
        assert mmb["n"] > 6  # every question asked once per rotation of its options
    assert analyze.main([str(out)]) == 0
    report = (out / "report.md").read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0].startswith("## 0. Control") and "**controlled: yes**" in report
    for text in ("### mmb (n=", "### pope (n=", "circular_accuracy", "## Seeds (0, 1): mean ± std",
                 "### Seed-vs-seed reference", "## Training side", "bits/byte last"):
        assert text in report, text
    result = json.loads((out / "analysis.json").read_text())
    st = result["statistics"]["pope"]
    assert st["chance"] == 0.5 and set(st["models"]) == set(BACKBONES)
    for m in st["models"].values():
        assert m["ci"][0] <= m["accuracy"] <= m["ci"][1]
    (pair,) = st["pairs"]
    assert pair["split"]["n_discordant"] == pair["table"]["n10"] + pair["table"]["n01"]
    ref = result["seeds"]["seed_reference"]
    assert set(ref) == set(BACKBONES) and all(0 <= r["discordant_share"] <= 1 for r in ref.values())
    tr = result["training"]["llama3-tiny-seed1"]
    assert tr["variant"] == "base" and tr["stages"]["stage2"]["steps"] == 1
    assert tr["stages"]["stage2"]["excluded"] == 1 and tr["stages"]["stage2"]["bpb_last"] > 0


def test_user_data_without_eval_files_fails_before_training(tmp_path):
    f = _user_files(tmp_path)
    base = ["--backbones", "llama1-tiny", "--output-dir", str(tmp_path / "out"),
            "--data-stage1", str(f["src"] / "stage1.json"), "--data-stage2", str(f["src"] / "stage2.json")]
    with pytest.raises(SystemExit, match="--eval NAME=FORMAT:PATH"):
        sweep.main(base)
    with pytest.raises(SystemExit, match="images are missing.*IMAGE_ROOT"):
        sweep.main([*base, "--eval", f"pope=pope:{f['pope']}"])  # POPE's images are not beside the file
    with pytest.raises(SystemExit, match="does not exist"):
        sweep.main([*base, "--eval", f"gqa=gqa:{tmp_path / 'testdev_balanced_questions.json'}"])
    assert not (tmp_path / "out" / "llama1-tiny").exists()  # nothing was trained


def test_sweep_refuses_a_run_made_with_other_settings_and_overwrite_retrains_it(tmp_path):
    out = tmp_path / "out"
    small = ["--max-steps", "1", "--stage1-samples", "16", "--stage2-samples", "8", "--eval-samples", "4"]
    # The case: a run trained by hand (seed 7, another lr, no vision cache) in the sweep's folder.
    assert train.main(["--backbone", "llama1-tiny", "--output-dir", str(out / "llama1-tiny"), "--seed", "7",
                       "--set", "stage2.lr=5e-3", "--max-steps", "1", "--no-progress",
                       "--set", f'data.synthetic_dir="{out / "data"}"', "--set", "data.synthetic_stage1=16",
                       "--set", "data.synthetic_stage2=8", "--set", "data.synthetic_eval=4"]) == 0
    argv = ["--backbones", "llama1-tiny", "--output-dir", str(out), "--no-progress", *small]
    with pytest.raises(SystemExit) as err:
        sweep.main(argv)
    msg = str(err.value)
    for line in ("train.seed: 7 -> 42", "stages[stage2].lr: 0.005 -> 0.001", "data.vision_cache: False -> True",
                 "--overwrite llama1-tiny"):
        assert line in msg, msg
    assert json.loads((out / "llama1-tiny" / "run.json").read_text())["config"]["train"]["seed"] == 7
    cfg = sweep.sweep_config(sweep.parse_args([*argv, "--overwrite", "llama1-tiny"]))
    digests = sweep.check_runs(cfg, out, {"llama1-tiny"}, 0)
    assert not (out / "llama1-tiny").exists() and set(digests) == {"llama1-tiny"}
