"""projector_mlp against its fp32 reference, both backends; ProjectorMLP loads LLaVA/HF projector weights.

Triton runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py), so the shapes are small: one friendly
(every dim a multiple of the 32-wide interpreter tile) and one awkward (39 rows, in=1152 as SigLIP,
hidden=123, out=59). Tolerances follow STYLE.md: ``2 * max|torch_lowp - ref32| + atol``.
"""

from __future__ import annotations

import pytest
import torch
from barnfast.kernels import ProjectorMLP, projector_mlp, projector_mlp_ref, rename_llava_mm_projector

from tests.utils import assert_close_to_ref

SHAPES = {
    "friendly": ((2, 32), 64, 128, 64),  # (leading dims of x, in, hidden, out)
    "awkward": ((3, 13), 1152, 123, 59),
}
# fp32: the kernel and torch differ only in summation order (K <= 1152 terms of O(1)).
ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-4}
NAMES = ("x", "w1", "b1", "w2", "b2")


def _inputs(shape, dtype, bias=True):
    lead, n_in, hidden, n_out = shape
    x = torch.randn(*lead, n_in)
    w1 = torch.randn(hidden, n_in) / n_in**0.5
    w2 = torch.randn(n_out, hidden) / hidden**0.5
    b1 = torch.randn(hidden) if bias else None
    b2 = torch.randn(n_out) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w1, b1, w2, b2)]


def _run(fn, tensors, dy, requires):
    """Output and input grads of ``(fn(*tensors) * dy).sum()``; ``requires``: which tensors want grads."""
    ts = [t.detach().clone().requires_grad_(r) if t is not None else None for t, r in zip(tensors, requires)]
    y = fn(*ts)
    y.backward(dy.to(y.dtype))
    return y, [t.grad if t is not None else None for t in ts]


def _check(tensors, dtype, approximate="none", backend="triton", requires=(True,) * 5):
    ours_fn = lambda *t: projector_mlp(*t, approximate=approximate, backend=backend)  # noqa: E731
    ref_fn = lambda *t: projector_mlp_ref(*t, approximate=approximate)  # noqa: E731
    dy = torch.randn(*tensors[0].shape[:-1], tensors[3].shape[0]).to(dtype).float()  # representable in dtype
    y32, g32 = _run(ref_fn, [t.float() if t is not None else None for t in tensors], dy, requires)
    lowp = _run(ref_fn, tensors, dy, requires) if dtype != torch.float32 else (None, [None] * 5)
    y, grads = _run(ours_fn, tensors, dy, requires)
    assert y.dtype == dtype and y.shape == y32.shape
    assert_close_to_ref("y", y, y32, lowp[0], atol=ATOL[dtype])
    for name, g, r, lp, t, req in zip(NAMES, grads, g32, lowp[1], tensors, requires):
        if t is None or not req:
            assert g is None, f"{name}: got a gradient it did not ask for"
            continue
        assert g.dtype == t.dtype, f"{name}: grad dtype {g.dtype} != {t.dtype}"
        assert_close_to_ref(f"d{name}", g, r, lp, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_projector_mlp_matches_reference(shape, dtype, backend):
    _check(_inputs(shape, dtype), dtype, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projector_mlp_tanh(dtype):
    _check(_inputs(SHAPES["awkward"], dtype), dtype, approximate="tanh")


def test_projector_mlp_no_bias():
    _check(_inputs(SHAPES["awkward"], torch.float32, bias=False), torch.float32)


@pytest.mark.parametrize(
    "requires",
    [
        (False, True, True, True, True),  # frozen vision features (the usual case)
        (True, False, False, True, True),  # frozen linear_1
        (False, False, False, True, False),
    ],  # only w2: db2 is skipped
    ids=["no_dx", "frozen_linear1", "only_w2"],
)
def test_projector_mlp_partial_grads(requires):
    _check(_inputs(SHAPES["awkward"], torch.float32), torch.float32, requires=requires)


def test_projector_mlp_does_not_keep_pre_activation_without_grad():
    x, w1, b1, w2, b2 = _inputs(SHAPES["friendly"], torch.float32)
    with torch.no_grad():
        y = projector_mlp(x, w1, b1, w2, b2, backend="triton")
    assert_close_to_ref("y", y, projector_mlp_ref(x, w1, b1, w2, b2), atol=ATOL[torch.float32])


def test_projector_mlp_custom_op_registration():
    """Fake impls, schema and autograd registration agree with the kernels (torch.compile relies on them)."""
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in _inputs(SHAPES["friendly"], torch.float32)]
    torch.library.opcheck(
        torch.ops.barnfast.projector_mlp.default,
        (x.reshape(-1, x.shape[-1]), w1, b1, w2, b2, "none", True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    compiled = torch.compile(
        lambda *t: projector_mlp(*t, backend="triton"), backend="aot_eager", fullgraph=True
    )
    y = compiled(x, w1, b1, w2, b2)
    y.sum().backward()
    assert_close_to_ref("compiled y", y, projector_mlp_ref(x, w1, b1, w2, b2), atol=ATOL[torch.float32])
    assert w1.grad is not None and x.grad is not None


def test_projector_mlp_rejects_bad_arguments():
    x, w1, b1, w2, b2 = _inputs(SHAPES["friendly"], torch.float32)
    with pytest.raises(ValueError, match="approximate"):
        projector_mlp(x, w1, b1, w2, b2, approximate="sigmoid")
    with pytest.raises(ValueError, match="do not chain"):
        projector_mlp(x, w1, b1, w2.t(), b2)


def _hf_projector(n_in, hidden, bias=True):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=n_in, intermediate_size=2 * n_in, num_hidden_layers=1, num_attention_heads=1
        ),
        text_config=LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=1,
            vocab_size=64,
        ),
        projector_hidden_act="gelu",
        multimodal_projector_bias=bias,
    )
    return LlavaMultiModalProjector(config)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_projector_module_loads_hf_llava_projector(backend):
    hf = _hf_projector(64, 96)
    ours = ProjectorMLP(64, 96, 96, backend=backend)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 37, 64)
    with torch.no_grad():
        assert_close_to_ref("HF vs ProjectorMLP", ours(x), hf(x), atol=1e-4)


def test_rename_llava_mm_projector():
    hf = _hf_projector(64, 96)
    sd = hf.state_dict()
    llava = {
        "model.mm_projector." + k.replace("linear_1.", "0.").replace("linear_2.", "2."): v
        for k, v in sd.items()
    }
    renamed = rename_llava_mm_projector(llava)
    assert set(renamed) == set(sd) and all(renamed[k] is sd[k] for k in sd)
    plain = {k.replace("linear_1.", "0.").replace("linear_2.", "2."): v for k, v in sd.items()}
    assert set(rename_llava_mm_projector(plain)) == set(sd)
    module = ProjectorMLP.from_llava_mm_projector(llava, backend="torch")
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(module(x), hf(x))
    with pytest.raises(ValueError, match="4.weight"):
        rename_llava_mm_projector({"model.mm_projector.4.weight": sd["linear_1.weight"]})
