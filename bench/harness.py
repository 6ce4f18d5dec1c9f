"""Shared benchmark harness: timing percentiles, peak memory, environment, result tables.

Every `bench/bench_<op>.py` measures its providers with these functions and writes its table with
`write_results`, so all results files have the same columns and the same environment header.

Timing: `time_fn` runs `warmup` calls, then `reps` timed calls, and reports p20/p50/p80 in ms
(CUDA events on GPU; `time.perf_counter` on CPU, where the numbers are CPU timings and say little
about a GPU). Peak memory: on CUDA, `torch.cuda.max_memory_allocated` above what was allocated
before the call; on CPU, the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above its resident set before the call.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cuda") -> str:
    """Human name of the device the benchmark runs on: the GPU's name, or the CPU model and core count."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    """File-name-safe form of a device name: letters, digits, '-' only."""
    out = "".join(c if c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def env_info(device: str | torch.device) -> dict:
    """Versions, device, date and git revision: the header of every results file."""
    info = {
        "date": _dt.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for mod in ("triton", "transformers", "liger_kernel", "flash_attn"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional, version unknown or not installed
            info[mod] = None
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        info["git"] = None
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, reps: int = 10) -> dict:
    """p20/p50/p80 wall time of `fn()` in milliseconds over `reps` calls after `warmup` calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"p20_ms": q[1], "p50_ms": statistics.median(times), "p80_ms": q[7]}


def _proc_status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object], device: str | torch.device) -> float:
    """Peak memory of one call of `fn()` in MiB, above what was in use just before it."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    before = _proc_status_mb("VmRSS")
    fn()
    return _proc_status_mb("VmHWM") - before


@dataclass
class Table:
    """Rows of one benchmark run, printed as a Markdown table and written with the environment."""

    name: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values) -> None:
        assert len(values) == len(self.columns), (values, self.columns)
        self.rows.append(list(values))

    def markdown(self) -> str:
        def fmt(v):
            if isinstance(v, float):
                return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
            return "—" if v is None else str(v)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def write_results(tables: list[Table], device: str | torch.device, bench: str, out_dir: Path | None = None) -> Path:
    """Print the tables and write them as `<bench>_<device>_<date>.md` and `.json` under bench/results/."""
    info = env_info(device)
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{bench}_{slug(info['device'])}_{info['date']}"
    header = "\n".join(f"- {k}: {v}" for k, v in info.items())
    body = []
    for t in tables:
        body.append(f"## {t.name}\n\n{t.markdown()}\n")
        body += [f"- {n}" for n in t.notes]
        body.append("")
    text = f"# {bench}\n\n{header}\n\n" + "\n".join(body)
    print(text)
    (out_dir / f"{stem}.md").write_text(text)
    payload = {"env": info, "tables": [{"name": t.name, "columns": t.columns, "rows": t.rows, "notes": t.notes}
                                        for t in tables]}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    return out_dir / f"{stem}.md"
