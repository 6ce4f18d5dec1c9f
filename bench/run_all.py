"""Every benchmark (and, on a GPU, the CUDA tests) in one run, plus a summary table.

    python -m bench.run_all              # what the machine can run: GPU shapes on CUDA, CPU shapes elsewhere
    python -m bench.run_all --list       # the steps and their commands, nothing run
    python -m bench.run_all --summary-only

Each step is a subprocess with its own time limit, so one slow or failing benchmark does not stop
the others; the whole run is planned to fit the device tool's 10-minute limit on an H100/H200
(``bench/gpu.sh`` is the entry point there). Each benchmark writes its own results file under
``bench/results/`` named ``<bench>_<device>_<date>``; the summary ``SUMMARY_<device>_<date>.md``
lists every step with its status, time and results file, followed by each file's tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Step:
    name: str
    gpu: list[str] | None  # command on a CUDA machine (None: CPU only)
    cpu: list[str] | None  # command elsewhere (None: GPU only)
    timeout_s: int  # on the GPU machine: these add up to the device tool's budget
    results_prefix: str | None  # the results file it writes, if any
    cpu_timeout_s: int | None = None  # on 2 shared CPU cores (None: timeout_s)


PY = sys.executable
CUDA_TESTS = ["tests/test_kernels_cuda.py", "tests/test_liger.py", "tests/test_patch.py", "tests/test_optim.py",
              "tests/test_parallel.py"]

# The pytest-benchmark suite (bench/test_micro_*.py); "{json}" becomes its --benchmark-json file.
MICROBENCH = [PY, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
              "--benchmark-group-by=group", "--benchmark-columns=min,median,max,rounds", "--benchmark-json={json}"]

# GPU time limits add up to 570 s of the device tool's 600 s (installing and start-up take the rest). On the
# GPU the microbenchmarks replace the per-op scripts (same ops, providers side by side, at real shapes); on
# CPU both run, at small shapes, each within its cpu_timeout_s on 2 shared cores (measured: see README).
STEPS = [
    Step("cuda-tests", [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CUDA_TESTS], None, 150, None),
    Step("microbench", MICROBENCH, MICROBENCH, 270, "microbench", cpu_timeout_s=600),
    # CPU: torch.compile of the full-logits reference is left to the microbench step. The acceptance shape
    # (N=2048, H=512, V=128256) costs 7-11 s per reference call: the step took 145 s on a quiet 2-core machine
    # (2026-12-01) and timed out at 300 s when the machine was shared (load ~12)
    Step("fused_linear_cross_entropy", None, [PY, "-m", "bench.bench_fused_linear_cross_entropy",
                                              "--providers", "reference,barnfast-torch"], 120,
         "bench_fused_linear_cross_entropy", cpu_timeout_s=300),
    Step("projector_mlp", None, [PY, "-m", "bench.bench_projector_mlp", "--images", "1"], 60,
         "bench_projector_mlp", cpu_timeout_s=180),
    Step("merge_visual_text", None, [PY, "-m", "bench.bench_merge_visual_text", "--dtype", "fp32"], 45,
         "bench_merge_visual_text", cpu_timeout_s=300),  # measured 178 s on 2 shared cores (2026-12-01)
    Step("planner", None, [PY, "-m", "bench.bench_planner"], 30, "bench_planner", cpu_timeout_s=120),
    Step("train_step", [PY, "-m", "bench.bench_train_step", "--gpu", "--layers", "4"],
         [PY, "-m", "bench.bench_train_step", "--cpu"], 150, "bench_train_step", cpu_timeout_s=300),
]


def gpu_budget_s() -> int:
    """Sum of the time limits of the steps a GPU machine runs."""
    return sum(s.timeout_s for s in STEPS if s.gpu is not None)


def microbench_markdown(json_path: Path) -> str:
    """The pytest-benchmark JSON as one markdown table: groups, providers side by side, CUDA-event times."""
    import json

    data = json.loads(Path(json_path).read_text())
    machine = data.get("machine_info", {})
    lines = ["# microbench", "", f"- date: {data.get('datetime', '?')}",
             f"- machine: {machine.get('cpu', {}).get('brand_raw', machine.get('node', '?'))}", "",
             "| group | provider | median ms | min ms | CUDA-event p50 ms | peak MiB | TFLOP/s or GB/s |",
             "|---|---|---|---|---|---|---|"]
    for b in sorted(data["benchmarks"], key=lambda b: (b.get("group") or "", b["name"])):
        st, ex = b["stats"], b.get("extra_info", {})
        med = st["median"]
        cuda = ex.get("cuda_event_p50_ms")
        t = (cuda / 1e3) if cuda else med
        rate = (f"{ex['gflop'] / t / 1e3:.3g} TFLOP/s" if "gflop" in ex else
                f"{ex['gbytes'] / t:.3g} GB/s" if "gbytes" in ex else "")
        peak = ex.get("peak_mib")
        lines.append(f"| {b.get('group')} | {ex.get('provider', b['param'] if b.get('param') else b['name'])} | "
                     f"{med * 1e3:.3g} | {st['min'] * 1e3:.3g} | {f'{cuda:.3g}' if cuda else '—'} | "
                     f"{f'{peak:.0f}' if peak is not None else '—'} | {rate} |")
    lines += ["", "No timing is asserted; CPU rows time the PyTorch paths at small shapes (bench/conftest.py)."]
    return "\n".join(lines) + "\n"


def device_slug_and_date() -> tuple[str, str]:
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.harness import env_info, slug

    info = env_info("cuda" if torch.cuda.is_available() else "cpu")
    return slug(info["device"]), info["date"]


def summarize(results_dir: Path, device_slug: str, date: str, statuses: list[dict] | None = None) -> Path:
    """Write SUMMARY_<device>_<date>.md from the results files of that device and date."""
    files = sorted(p for p in results_dir.glob(f"*_{device_slug}_{date}.md") if not p.name.startswith("SUMMARY"))
    lines = [f"# Benchmark summary: {device_slug}, {date}", ""]
    if statuses:
        lines += ["| step | status | seconds | results file |", "|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['file'] or '—'} |" for s in statuses]
        lines.append("")
    for f in files:
        body = f.read_text().split("\n")
        lines += [f"## {f.stem}", ""] + [x for x in body[1:] if not x.startswith("# ")] + [""]
    out = results_dir / f"SUMMARY_{device_slug}_{date}.md"
    out.write_text("\n".join(lines))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the steps and their commands; run nothing")
    p.add_argument("--only", nargs="*", help="run only these steps")
    p.add_argument("--summary-only", action="store_true", help="rebuild the summary from existing results files")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    if args.list:
        for s in steps:
            cmd = s.gpu if cuda else s.cpu
            limit = s.timeout_s if cuda else (s.cpu_timeout_s or s.timeout_s)
            where = "GPU only" if s.cpu is None else "CPU only"
            print(f"{s.name:28s} {limit:4d}s  {' '.join(cmd) if cmd else f'({where}: skipped here)'}")
        return 0
    slug_, date = device_slug_and_date()
    statuses = []
    if not args.summary_only:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cuda:
            env["BARNFAST_CUDA_TESTS"] = "1"
        for s in steps:
            cmd = s.gpu if cuda else s.cpu
            if cmd is None:
                where = "GPU only" if s.cpu is None else "CPU only"
                statuses.append({"name": s.name, "status": f"skipped ({where})", "seconds": 0.0, "file": None})
                continue
            limit = s.timeout_s if cuda else (s.cpu_timeout_s or s.timeout_s)
            json_out = RESULTS / f"{s.results_prefix}_{slug_}_{date}.json" if s.results_prefix else None
            cmd = [c.replace("{json}", str(json_out)) for c in cmd]
            t0 = time.time()
            print(f"== {s.name}: {' '.join(cmd)}", flush=True)
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit}s"
            if s.name == "microbench" and json_out is not None and json_out.exists():
                json_out.with_suffix(".md").write_text(microbench_markdown(json_out))
            made = RESULTS / f"{s.results_prefix}_{slug_}_{date}.md" if s.results_prefix else None
            statuses.append({"name": s.name, "status": status, "seconds": time.time() - t0,
                             "file": made.name if made is not None and made.exists() else None})
    out = summarize(RESULTS, slug_, date, statuses)
    print(out.read_text())
    return 0 if all(s["status"].startswith(("ok", "skipped")) for s in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
