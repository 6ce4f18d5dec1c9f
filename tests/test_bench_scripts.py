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
    assert run_all.gpu_budget_s() <= 570
    assert {s.name for s in run_all.STEPS} >= {"cuda-tests", "microbench", "fused_linear_cross_entropy",
                                                "projector_mlp", "merge_visual_text", "planner", "train_step"}
    gpu_steps = {s.name for s in run_all.STEPS if s.gpu is not None}
    assert gpu_steps == {"cuda-tests", "microbench", "train_step"}  # what bench/gpu.sh runs on one GPU
    for s in run_all.STEPS:  # every named module exists
        for cmd in (s.gpu or [], s.cpu or []):
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


def test_microbenchmarks_collect_providers_side_by_side_and_stay_out_of_the_test_run():
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    for op in ("test_micro_flce.py", "test_micro_projector.py", "test_micro_merge.py", "test_micro_planner.py"):
        assert any(op in i for i in ids), op
    for provider in ("barnfast", "torch eager", "torch.compile", "liger"):
        assert any("test_micro_flce.py" in i and provider in i for i in ids), provider
    assert any("llava loop" in i for i in ids)
    # the plain run (testpaths = ["tests"]) never collects bench/
    plain = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "tests/test_bench_scripts.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "bench/test_micro" not in plain.stdout


def test_microbench_json_becomes_one_table(tmp_path):
    data = {"datetime": "2026-12-01", "machine_info": {"cpu": {"brand_raw": "cpu"}}, "benchmarks": [
        {"group": "flce", "name": "test_flce[barnfast]", "param": "barnfast", "stats": {"median": 0.002, "min": 0.001},
         "extra_info": {"provider": "barnfast", "gflop": 6.0, "cuda_event_p50_ms": 2.0, "peak_mib": 10.0}},
        {"group": "merge", "name": "test_merge[llava loop]", "param": "llava loop",
         "stats": {"median": 0.004, "min": 0.003}, "extra_info": {"provider": "llava loop", "gbytes": 0.4}},
    ]}
    f = tmp_path / "mb.json"
    f.write_text(json.dumps(data))
    md = run_all.microbench_markdown(f)
    assert "| flce | barnfast | 2 | 1 | 2 | 10 | 3 TFLOP/s |" in md  # 6 GFLOP in 2 ms (CUDA events)
    assert "| merge | llava loop | 4 | 3 | — | — | 100 GB/s |" in md


def test_llava_sampler_keeps_modalities_apart_and_balances_rank_batches():
    import numpy as np

    from bench.bench_planner import llava665k_like_samples
    from bench.llava_sampler import (
        megabatch_chunks,
        modality_length_grouped_indices,
        rank_batches,
        split_to_even_chunks,
    )

    lens, has_image = llava665k_like_samples(5000, 3)
    signed = np.where(has_image, lens, -lens)
    order = modality_length_grouped_indices(signed, batch_size=16, world_size=8, seed=1)
    assert sorted(order.tolist()) == list(range(5000))  # a permutation of the epoch
    batches = rank_batches(order, 16)
    mixed = [b for b in batches if len(set(has_image[b].tolist())) > 1]
    assert len(mixed) <= 8  # only the joined last megabatch mixes modalities (LLaVA's "additional batch")
    # inside a megabatch the greedy split gives equal counts and near-equal total lengths
    chunks = megabatch_chunks(np.arange(128), lens, 8)
    assert [len(c) for c in chunks] == [16] * 8
    totals = [int(lens[c].sum()) for c in chunks]
    assert max(totals) - min(totals) <= int(lens[:128].max())
    # LLaVA's rule on a worked example: longest first to the lightest chunk, a full chunk takes no more
    assert [c.tolist() for c in split_to_even_chunks(np.array([0, 1, 2, 3]), np.array([9, 5, 4, 1]), 2)] == [
        [0, 3], [1, 2]]
    # the same seed gives the same order (the comparison is reproducible)
    assert np.array_equal(order, modality_length_grouped_indices(signed, 16, 8, seed=1))


def test_predict_gpu_traces_and_prices_a_step_on_meta_tensors(tmp_path):
    from bench import predict_gpu

    out = tmp_path / "pred.md"
    predict_gpu.main(["--llm", "llama3-tiny", "--tower", "clip-l-336-tiny", "--steps", "1", "--token-budget", "2048",
                      "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# PREDICTION (not a measurement)")
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| H100") or line.startswith("| A100")]
    assert len(rows) == 4
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0  # step ms, samples/s
    by = {(r[1].strip(), r[2].strip()): r for r in rows}
    # the recipe computes padded positions and full logits: more executed FLOPs than barnfast for the same work
    for gpu in ("A100-SXM4-80GB", "H100-SXM5-80GB"):
        assert float(by[gpu, "llava recipe"][7]) > float(by[gpu, "barnfast"][7])
        assert float(by[gpu, "barnfast"][6]) == float(by[gpu, "llava recipe"][6])  # same useful work
