"""Fused linear cross-entropy, forward + backward: barnfast vs full logits (eager, torch.compile) vs Liger.

Shapes: LLaMA-1/2 (H=4096, V=32000) and LLaMA-3 (H=4096, V=128256) from the backbone registry at an
8192-token micro-batch on CUDA; a 512-token, H=256 slice of the same vocabularies on CPU. Work per call:
3 GEMMs of 2*N*H*V FLOPs (logits, grad_hidden, grad_weight), in ``extra_info["gflop"]``.
"""

import pytest
import torch
from barnfast.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref

from barnfast.models import backbones
from bench.conftest import CUDA, DEVICE, DTYPE, liger_or_skip

VOCABS = {"llama2": backbones.from_name("llama2").vocab_size, "llama3": backbones.from_name("llama3").vocab_size}
N, H = (8192, backbones.from_name("llama3").hidden_size) if CUDA else (512, 256)
_compiled_ref = torch.compile(fused_linear_cross_entropy_ref)


def _provider(name):
    if name == "barnfast":  # Triton on CUDA, the chunked PyTorch backend on CPU
        return lambda h, w, y: fused_linear_cross_entropy(h, w, y)
    if name == "torch eager":
        return lambda h, w, y: fused_linear_cross_entropy_ref(h, w, y, upcast=False)
    if name == "torch.compile":
        return lambda h, w, y: _compiled_ref(h, w, y, upcast=False)
    loss = liger_or_skip("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")()
    return lambda h, w, y: loss(w, h, y)


@pytest.mark.parametrize("provider", ["barnfast", "torch eager", "torch.compile", "liger"])
@pytest.mark.parametrize("backbone", list(VOCABS))
def test_flce_fwd_bwd(measure, backbone, provider):
    V = VOCABS[backbone]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(DEVICE, DTYPE).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE, DTYPE).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    fn = _provider(provider)

    def step():
        h.grad = w.grad = None
        fn(h, w, y).backward()

    measure(step, group=f"flce fwd+bwd {backbone} N={N} H={H} V={V}", provider=provider,
            gflop=3 * 2 * N * H * V / 1e9)
