"""Every Triton kernel compiles clean for sm_80 (A100) and sm_90 (H100), on a machine without a GPU.

``bench/compile_report.py`` (the same code writes ``bench/results/kernel_compile_sm80_sm90.md``) calls each
launcher on meta tensors at the registry's shapes, turns every launch into the JIT's specialisation and, for
the autotuned projector kernel, into one compile per config its pruning keeps, and compiles each with
Triton's own compiler and ptxas for both architectures. This test runs it in a subprocess (this process
has ``TRITON_INTERPRET=1`` from conftest.py, which replaces ``triton.jit``) and fails on a compile error,
a register spill, shared memory over the architecture's limit, or a bf16 matmul without tensor-core
instructions in its SASS.

Cost: 164 compiles in 2 processes, 10-35 s each on the shared 2-core machine this was written on (cold run
there: 24 min under a load of ~12; warm: 18 s for this file); results are cached per compile under pytest's
cache folder, keyed by Triton's hash of each kernel's source and Triton's version, so a rerun with unchanged
kernels reads files only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile_report

ROOT = Path(__file__).resolve().parent.parent
# a cold cache compiles everything (minutes); pytest's default limit (pyproject) is 900 s
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def rows(request, tmp_path_factory):
    try:
        import triton.backends.nvidia  # noqa: F401  (the CUDA backend ships in the triton wheel)
    except ImportError as e:
        pytest.skip(f"triton has no NVIDIA backend here: {e}")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache_dir = (cache.mkdir("barnfast-kernel-compile") if cache is not None
                 else tmp_path_factory.mktemp("barnfast-kernel-compile"))
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_report", "--no-table", "--json", str(out), "--jobs", "2",
         "--cache-dir", str(cache_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_and_variant_is_compiled_for_both_archs(rows):
    seen = {(r["kernel"], r["arch"]) for r in rows}
    assert seen == {(k, a) for k in compile_report.KERNELS for a in compile_report.ARCHS}
    # a row names every launch that compiles to it ("dw2 erf bf16 / dw1 erf bf16": same specialisation)
    launches = {part.split()[0] for r in rows if r["kernel"] == "projector_mlp" for part in r["launch"].split(" / ")}
    assert launches == {"fc1", "fc2", "dw2", "dh", "dx", "dw1"}
    ce = {r["launch"] for r in rows if r["kernel"] == "flce_ce"}
    assert len(ce) == 16  # grad/loss x label smoothing x softcap x bf16/fp32
    # every config the projector's pruning keeps is compiled: in bf16 3 for fc1 (GELU epilogue), 2 for dh (GELU'
    # and GELU), 4 for the plain GEMMs; 2 each in fp32 (tests/test_autotune_keys.py checks the rule itself)
    per = {}
    for r in rows:
        if r["kernel"] != "projector_mlp" or r["arch"] != 90:
            continue
        for part in r["launch"].split(" / "):  # e.g. "fc1 erf bf16 clip-l"
            name, gelu, dtype, tower = part.split()
            if gelu == "erf":
                per.setdefault((name, dtype, tower), set()).add(r["config"])
    counts = {k: len(v) for k, v in per.items()}
    expect = {"fc1": 3, "dh": 2, "fc2": 4, "dw2": 4, "dx": 4, "dw1": 4}
    assert counts == {k: (expect[k[0]] if k[1] == "bf16" else 2) for k in counts}, counts
    # 6 launches x (bf16 at CLIP-L's and SigLIP's token counts, fp32 at CLIP-L's)
    assert len(counts) == 18, sorted(counts)


def test_no_compile_error_spill_shared_memory_overflow_or_matmul_without_tensor_cores(rows):
    bad = compile_report.problems(rows)
    assert not bad, f"{len(bad)} of {len(rows)} compiles unfit for the GPU:\n" + "\n".join(bad)


def test_bf16_matmuls_use_the_tensor_core_instruction_of_each_arch(rows):
    dots = [r for r in rows if r["kernel"] in compile_report.DOT_KERNELS and r["dtype"] == "bfloat16"]
    assert dots
    assert all(r["hmma"] > 0 and r["hgmma"] == 0 for r in dots if r["arch"] == 80)  # mma.sync; no wgmma on A100
    # sm_90: wgmma (HGMMA) where Triton can feed both operands from shared memory, mma.sync otherwise
    assert all(r["hgmma"] > 0 or r["hmma"] > 0 for r in dots if r["arch"] == 90)


def test_problems_flags_each_kind_of_defect():
    clean = {"kernel": "projector_mlp", "launch": "fc1 erf bf16", "config": "c", "arch": 80, "dtype": "bfloat16",
             "error": None, "registers": 200, "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0,
             "shared_bytes": 98304, "hmma": 64, "hgmma": 0}
    assert compile_report.problems([clean]) == []
    cases = [({"spill_store_bytes": 8}, "spills"), ({"shared_bytes": 170 * 1024}, "shared memory"),
             ({"hmma": 0}, "tensor-core"), ({"error": "CompilationError: x"}, "compile error"),
             ({"spill_store_bytes": None}, "ptxas")]
    for change, word in cases:
        (msg,) = compile_report.problems([{**clean, **change}])
        assert word in msg, msg
    # sm_90's limit is higher: 170 KiB fits there
    assert compile_report.problems([{**clean, "arch": 90, "hgmma": 4, "shared_bytes": 170 * 1024}]) == []
