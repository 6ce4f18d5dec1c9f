"""Benchmark: a two-backbone tiny sweep with and without the vision-feature cache, wall time side by side.

Each measurement is one ``python -m barnfast.sweep --backbones llama1-tiny,llama3-tiny --no-eval`` in a
fresh folder (built-in synthetic data generated, both stages trained for one epoch, exported, per
backbone), run as a subprocess so the wall time is what a user waits for:

- ``cache`` — the sweep's default: ``DIR/vision_cache`` starts empty (cold), the first backbone's
  precompute pass encodes every image once, the second backbone reads them all;
- ``no cache`` — ``--set data.vision_cache=""``: the tower runs in every training step of both backbones.

Two vision settings: the plain tiny CLIP twin (2 layers of width 32: the tower is a sliver of the
step, so this bounds the cache's overhead) and the same with S2 scales 1, 2, 3 (14 tower passes per
image, LLaVA-MORE's heaviest setting), where the tower's share of the step is large.

    python bench/bench_vision_cache.py          # writes bench/results/bench_vision_cache_<device>_<date>.md
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import Table, write_results  # noqa: E402

BACKBONES = "llama1-tiny,llama3-tiny"
SIZES = ["--stage1-samples", "96", "--stage2-samples", "64", "--eval-samples", "4"]
SETTINGS = {"clip-l-336-tiny": [], "clip-l-336-tiny + S2 [1,2,3]": ["--set", "model.s2_scales=[1, 2, 3]"]}
REPS = 2


def run_sweep(extra: list[str]) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-vc-") as tmp:
        cmd = [sys.executable, "-m", "barnfast.sweep", "--backbones", BACKBONES, "--output-dir", f"{tmp}/sweep",
               "--no-eval", "--no-progress", *SIZES, *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return time.perf_counter() - t0


def main() -> None:
    table = Table(name=f"two-backbone tiny sweep ({BACKBONES}), wall time in s, CPU",
                  columns=["vision", "no cache (median s)", "cache, cold (median s)", "no cache / cache",
                           "runs (no cache)", "runs (cache)"])
    for label, extra in SETTINGS.items():
        off, on = [], []
        for _ in range(REPS):  # interleaved, so drift on the shared machine hits both alike
            off.append(run_sweep([*extra, "--set", 'data.vision_cache=""']))
            on.append(run_sweep(extra))
        m_off, m_on = statistics.median(off), statistics.median(on)
        table.add(label, m_off, m_on, m_off / m_on, ", ".join(f"{x:.1f}" for x in off),
                  ", ".join(f"{x:.1f}" for x in on))
    table.notes += [
        "Each sweep: synthetic data generation, stage 1 (96 samples) and stage 2 (64) for one epoch, export, "
        "per backbone; --no-eval. Process start-up and imports included (~5 s per sweep).",
        "With the cache, the tower runs once per image for the whole sweep; without, once per image per "
        "backbone per epoch (here 2x), inside the training steps.",
        "CPU shared with other jobs (2 cores): treat differences under ~10% as noise.",
    ]
    write_results([table], "cpu", "bench_vision_cache")


if __name__ == "__main__":
    main()
