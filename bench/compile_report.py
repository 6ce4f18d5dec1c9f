"""Ahead-of-time compile of every Triton kernel in ``barnfast.kernels`` for sm_80 and sm_90, no GPU needed.

    python -m bench.compile_report            # table -> bench/results/kernel_compile_sm80_sm90.md
    python -m bench.compile_report --json out.json --no-table --jobs 2

What is compiled is what the launchers would launch: each launcher (``_matmul`` of the projector, the
CE step of the fused loss, the merge forward/backward) is called on ``meta`` tensors at the registry's
real shapes (LLaMA-1/2/3 and Qwen2 hidden/vocabulary sizes, CLIP-L/SigLIP widths, 8k and 16k-token
micro-batches, bf16 and fp32, every option that becomes a constexpr); the kernel launch is intercepted
and turned into Triton's own specialisation (the JIT's binder: which ints are 1, which pointers and ints
are 16-divisible), then, for an autotuned kernel, into one compile per config the autotuner keeps.
Each is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`` and
read back: registers and spill bytes from ptxas' ``-v`` log, shared memory from the kernel metadata,
tensor-core instructions (HMMA; HGMMA = sm_90 wgmma) counted in the SASS (``cuobjdump -sass``).

``problems(rows)`` is the rule the test ``tests/test_kernels_compile.py`` applies: a compile error, any
spill, shared memory over the architecture's per-block limit, or a low-precision matmul kernel without
tensor-core instructions. Results are cached per compile, keyed by the kernels' source, Triton's
version and the compile's specialisation, so a second run only reads files.

Triton must not be in interpreter mode (``TRITON_INTERPRET=1`` replaces ``triton.jit``): this module
imports ``barnfast.kernels`` only inside ``main()``/the worker processes, after removing the variable.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TABLE = ROOT / "bench" / "results" / "kernel_compile_sm80_sm90.md"

# Per-block shared-memory limits with the opt-in attribute (CUDA C programming guide, "Compute
# capabilities" table): sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)

# Registry shapes (barnfast.models.backbones / vision), written out so the report needs no transformers:
# hidden sizes of the LLMs, vocabularies, vision widths and visual tokens per image.
LLM_HIDDEN = (4096, 3584)  # LLaMA-1/2/3, Mistral; Qwen2-7B
VOCABS = (32000, 32064, 128256, 152064)  # LLaMA-1/2, Phi-3/LLaVA-Phi, LLaMA-3, Qwen2
VISION = ((1024, 576), (1152, 729))  # (width, tokens per image): CLIP-L/336, SigLIP so400m/384
MICRO_TOKENS = (8192, 16384)  # packed micro-batch token budgets
DTYPES = ("bfloat16", "float32")

KERNELS = {  # report name -> (module, attribute of the (autotuned) jit function)
    "projector_mlp": ("barnfast.kernels.projector_mlp", "_projector_mlp_matmul_kernel"),
    "flce_ce": ("barnfast.kernels.fused_linear_cross_entropy", "_flce_ce_kernel"),
    "merge_fwd": ("barnfast.kernels.merge_visual_text", "_merge_visual_text_fwd_kernel"),
    "merge_bwd": ("barnfast.kernels.merge_visual_text", "_merge_visual_text_bwd_kernel"),
}
# kernels whose inner loop is a tl.dot: in bf16 they must use tensor cores
DOT_KERNELS = {"projector_mlp"}


@dataclass
class Job:
    kernel: str  # key of KERNELS
    launch: str  # which launch / variant, e.g. "fc1 bf16" or "grad softcap fp32"
    config: str  # autotune config, or "-" for a kernel with fixed launch parameters
    arch: int
    dtype: str
    signature: dict
    constexprs: dict  # {name: value}
    attrs: dict  # {name: [["tt.divisibility", 16]]}
    options: dict  # num_warps, num_stages, ...

    def key(self) -> str:
        blob = json.dumps([self.kernel, self.arch, self.signature, sorted(self.constexprs.items()),
                           sorted(self.attrs.items()), sorted(self.options.items())], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------
# Which launches: run the real launchers on meta tensors and record each kernel call
# ---------------------------------------------------------------------------------------------------


def _without_interpreter() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset before triton is imported")
    os.environ.pop("TRITON_INTERPRET", None)


class _Recorder:
    """Stands in for ``kernel.run``: records (args, kwargs) of each launch instead of running it."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, grid=None, warmup=False, **kwargs):
        self.calls.append((args, kwargs))


@contextlib.contextmanager
def record_launches(kernel):
    """Intercept the launches of one ``@triton.jit`` / ``@triton.autotune`` kernel (instance attribute)."""
    rec = _Recorder()
    kernel.run = rec
    try:
        yield rec
    finally:
        del kernel.run


PROJECTOR_LAUNCHES = ("fc1", "fc2", "dh", "dw2", "dx", "dw1")  # launch order of the projector's fwd, then bwd


def projector_step_calls(rec, M: int, width: int, hidden: int, dtype, approximate: bool) -> list:
    """The (args, kwargs) of the projector kernel's launches for one fwd + bwd at (M, width) -> hidden on meta
    tensors, as recorded by ``rec`` (a :func:`record_launches` context): one per name in PROJECTOR_LAUNCHES."""
    import torch

    pm = importlib.import_module("barnfast.kernels.projector_mlp")
    x = torch.empty(M, width, device="meta", dtype=dtype)
    w1 = torch.empty(hidden, width, device="meta", dtype=dtype)
    w2 = torch.empty(hidden, hidden, device="meta", dtype=dtype)
    b = torch.empty(hidden, device="meta", dtype=dtype)
    n0 = len(rec.calls)
    _, h = pm._projector_mlp_fwd(x, w1, b, w2, b, approximate, True)
    dy = torch.empty(M, hidden, device="meta", dtype=dtype)
    pm._projector_mlp_bwd(dy, x, w1, h, w2, approximate, [True] * 5, dtype, dtype)
    return rec.calls[n0:]


def _projector_launches():
    import torch

    pm = importlib.import_module("barnfast.kernels.projector_mlp")
    out = []
    with record_launches(pm._projector_mlp_matmul_kernel) as rec:
        for dtype in DTYPES:
            dt = getattr(torch, dtype)
            # SigLIP's 729 tokens per image make M (or K) not 16-divisible, a second specialisation of every
            # launch; compiled for bf16, the training dtype (fp32 is checked at CLIP-L's 576-multiples)
            for width, per_image in VISION if dtype == "bfloat16" else VISION[:1]:
                for hidden in LLM_HIDDEN:
                    for tokens in MICRO_TOKENS:
                        M = (tokens // 2 // per_image) * per_image  # about half the micro-batch is visual
                        for approx in (False, True):
                            calls = projector_step_calls(rec, M, width, hidden, dt, approx)
                            tower = "clip-l" if width == 1024 else "siglip"
                            tag = f"{'tanh' if approx else 'erf'} {'bf16' if dtype == 'bfloat16' else 'fp32'} {tower}"
                            for name, call in zip(PROJECTOR_LAUNCHES, calls):
                                out.append(("projector_mlp", f"{name} {tag}", dtype, call))
    return out


def _flce_launches():
    import torch
    import triton

    fl = importlib.import_module("barnfast.kernels.fused_linear_cross_entropy")
    out = []
    with record_launches(fl._flce_ce_kernel) as rec:
        for dtype in DTYPES:
            dt = getattr(torch, dtype)
            for V in VOCABS:
                for H in LLM_HIDDEN:
                    for tokens in MICRO_TOKENS:
                        # the chunk rows the pass picks for this micro-batch (as in _chunked_pass)
                        per_chunk = triton.next_power_of_2(triton.cdiv(tokens, triton.cdiv(V, H)))
                        rows = max(fl.TRITON_MIN_CHUNK_ROWS, per_chunk)
                        for grad in (True, False):
                            for smoothing in (0.0, 0.1):
                                for softcap in (None, 30.0):
                                    logits = torch.empty(rows, V, device="meta", dtype=dt)
                                    target = torch.empty(rows, device="meta", dtype=torch.int64)
                                    scale = torch.empty((), device="meta", dtype=torch.float32).expand(rows)
                                    loss = torch.empty(rows, device="meta", dtype=torch.float32)
                                    n0 = len(rec.calls)
                                    fl._ce_step_triton(logits, target, scale, loss, grad, smoothing, softcap)
                                    tag = ("grad" if grad else "loss") + (" smooth" if smoothing else "") + (
                                        " softcap" if softcap else "") + (" bf16" if dtype == "bfloat16" else " fp32")
                                    out += [("flce_ce", tag, dtype, c) for c in rec.calls[n0:]]
    return out


def _merge_launches():
    import torch

    mv = importlib.import_module("barnfast.kernels.merge_visual_text")
    out = []
    fwd, bwd = mv._merge_visual_text_fwd_kernel, mv._merge_visual_text_bwd_kernel
    with record_launches(fwd) as rf, record_launches(bwd) as rb:
        for dtype in DTYPES:
            dt = getattr(torch, dtype)
            tag = "bf16" if dtype == "bfloat16" else "fp32"
            for V in VOCABS:
                for H in LLM_HIDDEN:
                    for tokens in MICRO_TOKENS:
                        ids = torch.empty(tokens, device="meta", dtype=torch.int64)
                        embed = torch.empty(V, H, device="meta", dtype=dt)
                        M = tokens // 2
                        visual = torch.empty(M, H, device="meta", dtype=dt)
                        n0 = len(rf.calls)
                        mv._merge_fwd(ids, embed, visual, 5)
                        out += [("merge_fwd", tag, dtype, c) for c in rf.calls[n0:]]
                        grad = torch.empty(tokens, H, device="meta", dtype=dt)
                        for ne, nv in ((True, True), (False, True), (True, False)):
                            n0 = len(rb.calls)
                            mv._merge_bwd(grad, ids, 5, V, M, ne, nv)
                            what = "+".join(n for n, on in (("embed", ne), ("visual", nv)) if on)
                            out += [("merge_bwd", f"{what} {tag}", dtype, c) for c in rb.calls[n0:]]
    return out


def _config_label(cfg) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} s{cfg.num_stages} w{cfg.num_warps}"


def build_jobs(archs=ARCHS) -> list[Job]:
    """Every distinct compile the launchers can ask for at the registry's shapes, for each arch."""
    _without_interpreter()
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    launches = _projector_launches() + _flce_launches() + _merge_launches()
    jobs, seen, binders = [], {}, {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for name, launch, dtype, (args, kwargs) in launches:
            module, attr = KERNELS[name]
            kernel = getattr(importlib.import_module(module), attr)
            if isinstance(kernel, Autotuner):
                fn = kernel.fn
                named = dict(zip(fn.arg_names, args))
                kernel.nargs = named  # what Autotuner.run sets before it prunes
                configs = kernel.prune_configs(kwargs)
                variants = [({**kwargs, **cfg.all_kwargs()}, _config_label(cfg)) for cfg in configs]
            else:
                fn = kernel
                variants = [(kwargs, "-")]
            if (name, arch) not in binders:
                binders[name, arch] = create_function_from_signature(fn.signature, fn.params, backend)
            binder = binders[name, arch]
            for kw, label in variants:
                bound, spec, options = binder(*args, **kw)
                opts, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
                # constexpr paths are tuples of argument positions; name them for a readable, picklable job
                cx = {fn.arg_names[p[0]]: v for p, v in constexprs.items()}
                at = {fn.arg_names[p[0]]: v for p, v in attrs.items()}
                tuned = {k: getattr(opts, k) for k in ("num_warps", "num_stages", "num_ctas")}
                job = Job(name, launch, label, arch, dtype, dict(signature), cx, at, tuned)
                # other shapes or launches with the same specialisation compile the same code: one job, the
                # launches that share it named together (dw1 and dw2 differ only in a runtime N)
                first = seen.get(job.key())
                if first is None:
                    seen[job.key()] = job
                    jobs.append(job)
                elif launch not in first.launch.split(" / "):
                    first.launch += f" / {launch}"
    return jobs


# ---------------------------------------------------------------------------------------------------
# One compile: ptxas -v log, metadata, SASS
# ---------------------------------------------------------------------------------------------------

_PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_one(job: Job) -> dict:
    """Compile ``job``; returns its row: registers, spill bytes, stack, shared bytes, HMMA/HGMMA counts."""
    _without_interpreter()
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    module, attr = KERNELS[job.kernel]
    kernel = getattr(importlib.import_module(module), attr)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    names = fn.arg_names
    row = {**asdict(job), "error": None}
    for k in ("signature", "constexprs", "attrs"):
        row.pop(k)
    t0 = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="barnfast-triton-")  # fresh Triton cache: ptxas must run to print its log
    knobs.cache.dir = cache
    knobs.nvidia.dump_ptxas_log = True
    try:
        src = ASTSource(
            fn,
            job.signature,
            {(names.index(k),): v for k, v in job.constexprs.items()},
            {(names.index(k),): v for k, v in job.attrs.items()},
        )
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        text = log.getvalue()
        m, r = _PTXAS_RE.search(text), _REGS_RE.search(text)
        row["registers"] = int(r.group(1)) if r else None
        row["stack_bytes"], row["spill_store_bytes"], row["spill_load_bytes"] = (
            (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (None, None, None)
        )
        row["shared_bytes"] = int(ck.metadata.shared)
        cubin = Path(cache) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        row["hmma"] = len(re.findall(r"\bHMMA\b", sass))
        row["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
    except Exception as e:  # noqa: BLE001 -- a compile error is a result (the test fails on it)
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# ---------------------------------------------------------------------------------------------------
# Cache, the checks, the table
# ---------------------------------------------------------------------------------------------------


# bump when a row's fields change, so cached rows of the old form are not read back
ROW_FORMAT = 1


def source_hash(kernel: str) -> str:
    """Hash of what decides one kernel's code: Triton's own cache key of the jit function (its source and
    the sources of the jit functions it calls) and Triton's version. The job key adds the specialisation,
    constexprs and launch options, so a new config is a new job and a comment edit recompiles nothing."""
    import triton
    from triton.runtime.autotuner import Autotuner

    module, attr = KERNELS[kernel]
    fn = getattr(importlib.import_module(module), attr)
    fn = fn.fn if isinstance(fn, Autotuner) else fn
    key = f"{triton.__version__} {ROW_FORMAT} {fn.cache_key}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "barnfast-kernel-compile"


def run_jobs(jobs: list[Job], cache_dir: Path, workers: int = 2, log=print) -> list[dict]:
    """Rows of every job, from ``cache_dir/<kernel>-<source hash>/<job key>.json`` or compiled in a pool."""
    folders = {k: cache_dir / f"{k}-{source_hash(k)}" for k in {j.kernel for j in jobs}}
    rows, todo = {}, []
    for job in jobs:
        f = folders[job.kernel] / f"{job.key()}.json"
        if f.exists():  # the compile's measurements; the labels are the current job's
            rows[job.key()] = {**json.loads(f.read_text()), "launch": job.launch, "config": job.config}
        else:
            todo.append(job)
    log(f"compile_report: {len(jobs)} compiles, {len(jobs) - len(todo)} cached under {cache_dir}, "
        f"{len(todo)} to do with {workers} processes")
    if todo:
        # spawn, not fork: each worker imports triton fresh, outside interpreter mode
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for job, row in zip(todo, pool.map(compile_one, todo)):
                folders[job.kernel].mkdir(parents=True, exist_ok=True)
                (folders[job.kernel] / f"{job.key()}.json").write_text(json.dumps(row))
                rows[job.key()] = row
    return [rows[j.key()] for j in jobs]


def problems(rows: list[dict]) -> list[str]:
    """What makes a compile unfit for the GPU; empty when every row is clean."""
    out = []
    for r in rows:
        what = f"{r['kernel']} [{r['launch']}] {r['config']} sm_{r['arch']}"
        if r["error"]:
            out.append(f"{what}: compile error {r['error']}")
            continue
        if r["spill_store_bytes"] is None:
            out.append(f"{what}: no ptxas -v report in the compile log")
        elif r["spill_store_bytes"] or r["spill_load_bytes"]:
            out.append(f"{what}: spills {r['spill_store_bytes']} B stores / {r['spill_load_bytes']} B loads "
                       f"at {r['registers']} registers")
        if r["shared_bytes"] > SMEM_LIMIT[r["arch"]]:
            out.append(f"{what}: {r['shared_bytes']} B shared memory > sm_{r['arch']} limit "
                       f"{SMEM_LIMIT[r['arch']]} B")
        if r["kernel"] in DOT_KERNELS and r["dtype"] != "float32" and not (r["hmma"] or r["hgmma"]):
            out.append(f"{what}: bf16 matmul without tensor-core instructions (no HMMA/HGMMA in SASS)")
    return out


def table_markdown(rows: list[dict]) -> str:
    import triton

    bad = problems(rows)
    lines = [
        "# Triton kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100)",
        "",
        f"Generated by `python -m bench.compile_report` (Triton {triton.__version__}, its bundled ptxas and "
        f"cuobjdump), {time.strftime('%Y-%m-%d')}. No GPU was used: each row is "
        "`triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))` at a specialisation the "
        "launchers produce for the registry's shapes (LLaMA-1/2/3, Qwen2 hidden 4096/3584, vocabularies "
        f"{', '.join(map(str, VOCABS))}; CLIP-L 1024 and SigLIP 1152 widths; {', '.join(map(str, MICRO_TOKENS))}"
        "-token micro-batches; bf16 and fp32), one row per autotune config the autotuner may pick.",
        "",
        f"Limits checked (tests/test_kernels_compile.py): no spill, shared memory <= {SMEM_LIMIT[80]} B "
        f"(sm_80) / {SMEM_LIMIT[90]} B (sm_90) per block, tensor-core instructions in every bf16 matmul "
        "(HMMA = mma.sync, HGMMA = sm_90 wgmma). fp32 matmuls use IEEE fp32 FMA unless torch allows TF32.",
        "",
        f"{len(rows)} compiles, {len(bad)} problems." + ("" if not bad else " Problems:"),
    ]
    lines += [f"- {p}" for p in bad]
    lines += [
        "",
        "| kernel | launch | config | arch | registers | spill st/ld B | stack B | shared KiB | HMMA | HGMMA |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["launch"], r["config"], r["arch"])):
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['launch']} | {r['config']} | sm_{r['arch']} | error: "
                         f"{r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['launch']} | {r['config']} | sm_{r['arch']} | {r['registers']} | "
            f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['stack_bytes']} | "
            f"{r['shared_bytes'] / 1024:.1f} | {r['hmma']} | {r['hgmma']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_TABLE, help="markdown table to write")
    p.add_argument("--no-table", action="store_true", help="do not write the markdown table")
    p.add_argument("--json", type=Path, help="also write every row as JSON here")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--jobs", type=int, default=2, help="compile processes (ptxas is single-threaded)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--check", action="store_true", help="exit 1 when problems() is not empty")
    p.add_argument("--filter", help="only compiles whose 'kernel launch config' matches this regex (for development)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    jobs = build_jobs(tuple(args.arch))
    if args.filter:
        jobs = [j for j in jobs if re.search(args.filter, f"{j.kernel} {j.launch} {j.config}")]
    rows = run_jobs(jobs, args.cache_dir, args.jobs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_table:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table_markdown(rows))
    bad = problems(rows)
    print(f"compile_report: {len(rows)} compiles, {len(bad)} problems, {time.perf_counter() - t0:.0f} s")
    for b in bad:
        print("  " + b)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
