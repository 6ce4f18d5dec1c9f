"""The CPU-safe parts of the GPU benchmark command: syntax, the step list, the summary table."""

import json
import py_compile
import subprocess
import sys
from pathlib import Path

from bench import run_all
from bench.harness import Table, write_results

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_and_benchmarks_parse():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
    for f in sorted((ROOT / "bench").glob("*.py")):
        py_compile.compile(str(f), doraise=True)


def test_steps_fit_the_device_time_limit_and_list():
    assert sum(s.timeout_s for s in run_all.STEPS) <= 570
    assert {s.name for s in run_all.STEPS} >= {"cuda-tests", "fused_linear_cross_entropy", "projector_mlp",
                                                "merge_visual_text", "planner", "train_step"}
    for s in run_all.STEPS:  # every named module exists
        for cmd in (s.gpu, s.cpu or []):
            if "-m" in cmd and cmd[cmd.index("-m") + 1].startswith("bench."):
                assert (ROOT / (cmd[cmd.index("-m") + 1].replace(".", "/") + ".py")).exists()
    out = subprocess.run([sys.executable, "-m", "bench.run_all", "--list"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "GPU only" in out and "bench.bench_planner" in out


def test_summary_collects_the_results_of_one_device_and_date(tmp_path):
    t = Table("demo", ["provider", "p50_ms"])
    t.add("barnfast", 1.5)
    write_results([t], "cpu", "bench_demo", out_dir=tmp_path)
    stem = next(tmp_path.glob("bench_demo_*.json")).stem
    slug, date = stem[len("bench_demo_"):].rsplit("_", 1)
    statuses = [{"name": "demo", "status": "ok", "seconds": 1.0, "file": stem + ".md"}]
    summary = run_all.summarize(tmp_path, slug, date, statuses).read_text()
    assert "| demo | ok | 1 |" in summary and "| barnfast | 1.5 |" in summary
    assert json.loads((tmp_path / f"{stem}.json").read_text())["tables"][0]["rows"] == [["barnfast", 1.5]]
