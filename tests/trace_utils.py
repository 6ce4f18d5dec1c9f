"""Dispatch-level tracing of a real train step on CPU: GEMM precision and device-to-host syncs.

:class:`OpTrace` is a ``TorchDispatchMode`` that sees every aten op the step runs, forward and
backward, *including those inside barnfast's custom ops* (``barnfast::*``: it runs their Python
implementation under itself instead of treating them as opaque). It records

- every GEMM-like op (mm, addmm, bmm, baddbmm, matmul, linear, convolution, fused SDPA) with its
  matrix operands' dtypes and its FLOPs (2 · K · numel(out); SDPA 4 · B · H · Tq · Tk · D), and
- every op that makes the host wait for the device on a GPU (``_local_scalar_dense`` behind
  ``.item()`` / ``bool()`` / ``int()``, ``nonzero``, ``is_nonzero``, ``masked_select``, ``unique``,
  ``equal``, ...: ops whose result or output *size* the host needs), plus ``Tensor.tolist`` /
  ``numpy`` / ``cpu`` calls, which on CPU-only torch dispatch nothing but copy device→host on a GPU.

The trace is per *phase* (``micro_step``, ``optimizer_step``, ...) set by :meth:`OpTrace.phase`, so a
test can hold micro-steps to zero syncs and an optimizer step to a fixed few.
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops whose output (or output size) the host must read: a device→host sync on a GPU
SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select", "aten::unique",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
    "aten::allclose", "aten::is_set_to", "aten::argwhere", "aten::masked_scatter_backward", "aten::nonzero_numpy",
    "aten::bincount", "aten::histc",
}
# x[mask] and x[mask] = y: the output size is the mask's count (a nonzero on the device, not dispatched on CPU)
BOOL_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
# GEMM-like ops: (index of the first matrix operand, index of the second) in the positional args
GEMM_OPS = {
    "aten::mm": (0, 1), "aten::bmm": (0, 1), "aten::matmul": (0, 1), "aten::addmm": (1, 2),
    "aten::addmm_": (1, 2), "aten::baddbmm": (1, 2), "aten::addbmm": (1, 2), "aten::linear": (0, 1),
    "aten::convolution": (0, 1), "aten::_convolution": (0, 1), "aten::mkldnn_convolution": (0, 1),
}
SDPA_PREFIX = "aten::_scaled_dot_product_"


@dataclass
class GemmRecord:
    op: str
    dtypes: tuple[str, ...]
    flops: float


@dataclass
class PhaseTrace:
    gemms: list[GemmRecord] = field(default_factory=list)
    syncs: Counter = field(default_factory=Counter)
    calls: int = 0  # how many times the phase was entered


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else type(t).__name__


def _gemm_flops(name: str, args, out) -> float:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    o = outs[0]
    if name.startswith(SDPA_PREFIX):  # forward, (B, H, T, D) query / key: QK^T and PV, 2 FLOPs per MAC each
        q, k = args[0], args[1]
        return 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] if q.dim() == 4 else 0.0
    if "convolution" in name:
        w = args[1]
        return 2.0 * o.numel() * (w.numel() // w.shape[0])
    i, _ = GEMM_OPS[name]
    a = args[i]
    return 2.0 * a.shape[-1] * o.numel()


@contextlib.contextmanager
def _autocast_probe(stack: list):
    """Notes the autocast state at each call of a custom op (``CustomOpDef.__call__``, forward and backward).

    Inside ``__torch_dispatch__`` autocast is off, so :class:`OpTrace` re-runs a custom op's Python body
    under the autocast state its caller had (what the body sees in a real run). A Python-level wrapper, not a
    ``TorchFunctionMode``: with one active, torch 2.13 crashes formatting an argument error for these ops."""
    original = custom_ops.CustomOpDef.__call__

    def probed(self, *args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        stack.append((self._qualname, dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        try:
            return original(self, *args, **kwargs)
        finally:
            stack.pop()

    custom_ops.CustomOpDef.__call__ = probed
    try:
        yield
    finally:
        custom_ops.CustomOpDef.__call__ = original


class OpTrace(TorchDispatchMode):
    """Records GEMM precision and host syncs per phase; see the module docstring. Enter with :meth:`active`."""

    def __init__(self):
        super().__init__()
        self.phases: dict[str, PhaseTrace] = defaultdict(PhaseTrace)
        self._phase: list[str] = []
        self._autocast: list[tuple] = []

    @contextlib.contextmanager
    def active(self):
        with _autocast_probe(self._autocast), self:
            yield self

    @contextlib.contextmanager
    def phase(self, name: str):
        self._phase.append(name)
        self.phases[name].calls += 1
        try:
            yield
        finally:
            self._phase.pop()

    @property
    def current(self) -> PhaseTrace | None:
        return self.phases[self._phase[-1]] if self._phase else None

    def count_sync(self, what: str) -> None:
        if self.current is not None:
            self.current.syncs[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func.namespace == "barnfast" and name in custom_ops.OPDEFS:
            # look inside: run the op's Python body with this mode on again, under its caller's autocast
            # state (one not seen by the probe gets autocast off)
            top = self._autocast[-1] if self._autocast and self._autocast[-1][0] == name else None
            dev, enabled, dtype = top[1:] if top else ("cpu", False, torch.bfloat16)
            with self, torch.autocast(dev, dtype=dtype, enabled=enabled):
                return custom_ops.OPDEFS[name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        rec = self.current
        if rec is None:
            return out
        if name in SYNC_OPS:
            rec.syncs[name.removeprefix("aten::")] += 1
        elif name in BOOL_INDEX_OPS and any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                                            for t in (args[1] if len(args) > 1 else ()) if t is not None):
            rec.syncs[f"{name.removeprefix('aten::')}(bool mask)"] += 1  # a nonzero inside, on every device
        elif name in GEMM_OPS or (name.startswith(SDPA_PREFIX) and "backward" not in name):
            if name in GEMM_OPS:
                i, j = GEMM_OPS[name]
                operands = (args[i], args[j])
            else:
                operands = tuple(args[:3])
            rec.gemms.append(GemmRecord(name.removeprefix("aten::"), tuple(_dtype_name(t) for t in operands),
                                        _gemm_flops(name, args, out)))
        return out


@contextlib.contextmanager
def count_host_reads(trace: OpTrace):
    """Count ``Tensor.tolist`` / ``numpy`` / ``cpu`` calls in the current phase (device→host copies on a GPU,
    invisible to a dispatch mode on CPU-only torch, where they copy nothing)."""
    originals = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy", "cpu")}

    inside = []  # count the outermost call only (a method may call another, e.g. numpy() after cpu())

    def wrap(n, fn):
        def counted(self, *a, **k):
            if not inside:
                trace.count_sync(f"Tensor.{n}")
            inside.append(n)
            try:
                return fn(self, *a, **k)
            finally:
                inside.pop()
        return counted

    for n, fn in originals.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)


def precision_table(gemms: list[GemmRecord]) -> tuple[float, str]:
    """(share of GEMM FLOPs with an fp32 operand, a table: op, operand dtypes, calls, share of FLOPs)."""
    total = sum(g.flops for g in gemms) or 1.0
    by = defaultdict(lambda: [0, 0.0])
    for g in gemms:
        by[(g.op, g.dtypes)][0] += 1
        by[(g.op, g.dtypes)][1] += g.flops
    fp32 = sum(g.flops for g in gemms if "float32" in g.dtypes) / total
    lines = [f"{'op':<44} {'operand dtypes':<28} {'calls':>6} {'FLOPs share':>11}"]
    for (op, dts), (n, fl) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{op:<44} {','.join(dts):<28} {n:>6} {fl / total:>10.1%}")
    lines.append(f"fp32-operand share of {total:.3e} GEMM FLOPs: {fp32:.1%}")
    return fp32, "\n".join(lines)


def trace_trainer_phases(monkeypatch, trace: OpTrace) -> None:
    """Phases of the real trainer: ``micro_step`` (forward + backward of one micro-batch), ``train_step``
    (the rest of an optimizer step, and the per-step preemption check), ``optimizer.step`` (the update)."""
    from barnfast.training import trainer as T

    micro, step, preempted = T.Trainer._micro_step, T.Trainer.train_step, T.Trainer._preempted

    def traced_micro(self, *a, **k):
        with trace.phase("micro_step"):
            return micro(self, *a, **k)

    def traced_step(self, module, opt, *a, **k):
        update = opt.step

        def traced_update(*x, **y):
            with trace.phase("optimizer.step"):
                return update(*x, **y)

        opt.step = traced_update
        try:
            with trace.phase("train_step"):
                return step(self, module, opt, *a, **k)
        finally:
            del opt.step

    def traced_preempted(self):
        with trace.phase("train_step"):
            return preempted(self)

    monkeypatch.setattr(T.Trainer, "_micro_step", traced_micro)
    monkeypatch.setattr(T.Trainer, "train_step", traced_step)
    monkeypatch.setattr(T.Trainer, "_preempted", traced_preempted)


def tiny_stage2_args(backbone: str, out, steps: int = 2) -> list[str]:
    """A few optimizer steps of stage 2 (projector + LLM) through the real CLI, bf16 autocast on CPU."""
    return ["--backbone", backbone, "--output-dir", str(out), "--stages", "stage2", "--max-steps", str(steps),
            "--set", 'train.dtype="bf16"', "--set", "data.synthetic_stage1=8", "--set", "data.synthetic_stage2=32",
            "--set", "data.synthetic_eval=2", "--set", "data.num_workers=0", "--no-progress"]
