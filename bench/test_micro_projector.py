"""LLaVA-1.5 ``mlp2x_gelu`` projector, forward + backward with the vision tower frozen (x needs no grad).

Shapes on CUDA: CLIP-L/336 (576 tokens x 1024) and SigLIP-so400m/384 (729 x 1152) from the vision
registry, 16 images, into LLaMA's hidden 4096; on CPU one CLIP-L image into a 512-wide LLM. FLOPs
(``extra_info["gflop"]``): forward 2*M*(in*hidden + hidden*out), backward dh, dw2, dw1 = 2*M*hidden*(2*out + in).
No Liger provider: Liger-Kernel has no fused projector MLP. On CPU barnfast's ``auto`` backend *is* the
eager reference, so the barnfast row is skipped there.
"""

import pytest
import torch
from barnfast.kernels import projector_mlp, projector_mlp_ref

from barnfast.models import backbones, vision
from bench.conftest import CUDA, DEVICE, DTYPE

TOWERS = {name: vision.from_name(name) for name in ("clip-l-336", "siglip-so400m-384")}
IMAGES, HIDDEN = (16, backbones.from_name("llama2").hidden_size) if CUDA else (1, 512)
_compiled_ref = torch.compile(projector_mlp_ref)


@pytest.mark.parametrize("provider", ["barnfast", "torch eager", "torch.compile"])
@pytest.mark.parametrize("tower", list(TOWERS) if CUDA else ["clip-l-336"])
def test_projector_fwd_bwd(measure, tower, provider):
    if provider == "barnfast" and not CUDA:
        pytest.skip("on CPU barnfast's backend='auto' runs the eager reference (the 'torch eager' row)")
    spec = TOWERS[tower]
    M, n_in = IMAGES * spec.num_tokens, spec.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, n_in, generator=g).to(DEVICE, DTYPE)
    w1 = (torch.randn(HIDDEN, n_in, generator=g) / n_in**0.5).to(DEVICE, DTYPE).requires_grad_()
    w2 = (torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5).to(DEVICE, DTYPE).requires_grad_()
    b1 = torch.zeros(HIDDEN).to(DEVICE, DTYPE).requires_grad_()
    b2 = torch.zeros(HIDDEN).to(DEVICE, DTYPE).requires_grad_()
    dy = torch.randn(M, HIDDEN, generator=g).to(DEVICE, DTYPE)
    fn = {"barnfast": projector_mlp, "torch eager": projector_mlp_ref, "torch.compile": _compiled_ref}[provider]

    def step():
        for p in (w1, b1, w2, b2):
            p.grad = None
        fn(x, w1, b1, w2, b2).backward(dy)

    measure(step, group=f"projector fwd+bwd {tower} x{IMAGES} -> {HIDDEN}", provider=provider,
            gflop=(2 * M * (n_in * HIDDEN + HIDDEN * HIDDEN) + 2 * M * HIDDEN * (2 * HIDDEN + n_in)) / 1e9)
