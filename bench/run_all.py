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
    gpu: list[str]  # command on a CUDA machine
    cpu: list[str] | None  # command elsewhere (None: GPU only)
    timeout_s: int
    results_prefix: str | None  # the results file it writes, if any


PY = sys.executable
CUDA_TESTS = ["tests/test_kernels_cuda.py", "tests/test_liger.py", "tests/test_patch.py", "tests/test_optim.py",
              "tests/test_parallel.py"]

# Time limits add up to 555 s, leaving the rest of the device tool's 600 s for installing and start-up.
STEPS = [
    Step("cuda-tests", [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CUDA_TESTS], None, 150, None),
    Step("fused_linear_cross_entropy", [PY, "-m", "bench.bench_fused_linear_cross_entropy"],
         [PY, "-m", "bench.bench_fused_linear_cross_entropy"], 120, "bench_fused_linear_cross_entropy"),
    Step("projector_mlp", [PY, "-m", "bench.bench_projector_mlp", "--device", "cuda", "--dtype", "bf16",
                           "--images", "1", "4", "16"],
         [PY, "-m", "bench.bench_projector_mlp", "--images", "1"], 60, "bench_projector_mlp"),
    Step("merge_visual_text", [PY, "-m", "bench.bench_merge_visual_text", "--device", "cuda", "--dtype", "bf16"],
         [PY, "-m", "bench.bench_merge_visual_text"], 45, "bench_merge_visual_text"),
    Step("planner", [PY, "-m", "bench.bench_planner"], [PY, "-m", "bench.bench_planner"], 30, "bench_planner"),
    Step("train_step", [PY, "-m", "bench.bench_train_step", "--gpu", "--layers", "4"],
         [PY, "-m", "bench.bench_train_step", "--cpu"], 150, "bench_train_step"),
]


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
            print(f"{s.name:28s} {s.timeout_s:4d}s  {' '.join(cmd) if cmd else '(GPU only: skipped here)'}")
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
                statuses.append({"name": s.name, "status": "skipped (GPU only)", "seconds": 0.0, "file": None})
                continue
            t0 = time.time()
            print(f"== {s.name}: {' '.join(cmd)}", flush=True)
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=s.timeout_s).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {s.timeout_s}s"
            made = RESULTS / f"{s.results_prefix}_{slug_}_{date}.md" if s.results_prefix else None
            statuses.append({"name": s.name, "status": status, "seconds": time.time() - t0,
                             "file": made.name if made is not None and made.exists() else None})
    out = summarize(RESULTS, slug_, date, statuses)
    print(out.read_text())
    return 0 if all(s["status"].startswith(("ok", "skipped")) for s in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
