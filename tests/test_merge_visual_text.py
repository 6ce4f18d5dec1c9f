"""merge_visual_text against its reference, both backends, on a packed row that has images at the start,
middle and end of samples, a sample with two images, a sample without one, and repeated text ids.

The forward and grad_visual are row copies: exact. grad_embed sums repeated rows: STYLE.md's rule
``2 * max|torch_lowp - ref32| + atol`` against an fp32 reference.
"""

from __future__ import annotations

import pytest
import torch
from barnfast.kernels import merge_visual_text, merge_visual_text_ref

from tests.utils import assert_close_to_ref

V = 97  # vocabulary: not a multiple of any block
IMAGE_TOKEN_ID = 41  # inside the table, as when the trainer adds <image> to the vocabulary
HIDDEN = {"odd": 123, "two_blocks": 300}  # 300 = one full 256-wide block + a partial one
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _packed_ids(with_images: bool = True) -> torch.Tensor:
    """(T,) ids of 5 packed samples; text ids from 0..7, so most ids repeat many times."""
    text = lambda n: torch.randint(0, 8, (n,))  # noqa: E731  (IMAGE_TOKEN_ID=41 is never drawn)
    img = lambda n: torch.full((n,), IMAGE_TOKEN_ID)  # noqa: E731
    samples = [
        [img(5), text(7)],  # image at the start
        [text(4), img(5), text(6)],  # image in the middle
        [text(9), img(5)],  # image at the end
        [text(11)],  # no image
        [img(3), text(2), img(4)],  # two images
    ]
    ids = torch.cat([p for s in samples for p in s])
    if not with_images:
        ids = torch.where(ids == IMAGE_TOKEN_ID, 3, ids)
    return ids  # T = 61: not a multiple of the 16-row block


def _inputs(hidden, dtype, with_images=True):
    ids = _packed_ids(with_images)
    n_img = int((ids == IMAGE_TOKEN_ID).sum())
    embed = torch.randn(V, hidden).to(dtype)
    embed[IMAGE_TOKEN_ID] = float("nan")  # the placeholder's row must never be read
    visual = torch.randn(n_img, hidden).to(dtype)
    return ids, embed, visual


def _run(fn, ids, embed, visual, dy, need_embed=True, need_visual=True):
    e = embed.detach().clone().requires_grad_(need_embed)
    v = visual.detach().clone().requires_grad_(need_visual)
    out = fn(ids, e, v)
    out.backward(dy.to(out.dtype))
    return out, e.grad, v.grad


def _check(hidden, dtype, backend, need_embed=True, need_visual=True, with_images=True, **kwargs):
    ids, embed, visual = _inputs(hidden, dtype, with_images)
    assert (torch.bincount(ids[ids != IMAGE_TOKEN_ID]) > 3).any(), "test data must repeat text ids"
    dy = torch.randn(ids.shape[0], hidden).to(dtype)
    ours = lambda i, e, v: merge_visual_text(i, e, v, IMAGE_TOKEN_ID, backend=backend, **kwargs)  # noqa: E731
    ref = lambda i, e, v: merge_visual_text_ref(i, e, v, IMAGE_TOKEN_ID)  # noqa: E731
    out, ge, gv = _run(ours, ids, embed, visual, dy, need_embed, need_visual)
    out32, ge32, gv32 = _run(ref, ids, embed.float(), visual.float(), dy.float(), need_embed, need_visual)
    assert out.dtype == dtype and out.shape == (ids.shape[0], hidden)
    assert torch.equal(out.float(), out32), "forward rows must be exact copies"
    assert torch.isfinite(out).all(), "the placeholder's (NaN) table row leaked into the output"
    if need_visual:
        assert torch.equal(gv.float(), gv32), "grad_visual must be an exact gather of grad_out rows"
    else:
        assert gv is None
    if need_embed:
        lowp = (
            _run(ref, ids, embed, visual, dy, need_embed, need_visual)[1] if dtype != torch.float32 else None
        )
        assert_close_to_ref("grad_embed", ge, ge32, lowp, atol=1e-6)
        assert ge.dtype == dtype
        assert (ge[IMAGE_TOKEN_ID] == 0).all(), "the placeholder row must get no gradient"
    else:
        assert ge is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN.values(), ids=HIDDEN.keys())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_merge_matches_reference(hidden, dtype, backend):
    _check(hidden, dtype, backend)


@pytest.mark.parametrize(
    "need_embed,need_visual", [(False, True), (True, False)], ids=["frozen_llm", "frozen_visual"]
)
def test_merge_skips_unneeded_grads(need_embed, need_visual):
    _check(HIDDEN["odd"], torch.float32, "triton", need_embed=need_embed, need_visual=need_visual)


def test_merge_without_images():
    _check(HIDDEN["odd"], torch.bfloat16, "triton", with_images=False)


def test_merge_with_known_count_skips_the_host_count():
    ids, embed, visual = _inputs(HIDDEN["odd"], torch.float32)
    n = visual.shape[0]
    out = merge_visual_text(ids, embed, visual, IMAGE_TOKEN_ID, backend="triton", num_image_tokens=n)
    assert torch.equal(out, merge_visual_text_ref(ids, embed, visual, IMAGE_TOKEN_ID))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_merge_count_mismatch_names_both_numbers(backend):
    ids, embed, visual = _inputs(HIDDEN["odd"], torch.float32)
    n = visual.shape[0]  # 22 placeholders
    with pytest.raises(ValueError, match=rf"{n - 1} visual rows but {n} placeholder"):
        merge_visual_text(ids, embed, visual[:-1], IMAGE_TOKEN_ID, backend=backend)
    with pytest.raises(ValueError, match=rf"{n} visual rows but {n + 1} placeholder"):
        merge_visual_text(ids, embed, visual, IMAGE_TOKEN_ID, backend=backend, num_image_tokens=n + 1)


def test_merge_rejects_bad_arguments():
    ids, embed, visual = _inputs(HIDDEN["odd"], torch.float32)
    with pytest.raises(ValueError, match="outside the table"):
        merge_visual_text(ids, embed, visual, V)
    with pytest.raises(ValueError, match="H="):
        merge_visual_text(ids, embed, visual[:, :-1], IMAGE_TOKEN_ID)


def test_merge_custom_op_registration():
    """Fake impls, schema and autograd registration agree with the kernels (what torch.compile relies on)."""
    ids, embed, visual = _inputs(HIDDEN["odd"], torch.float32)
    embed[IMAGE_TOKEN_ID] = 0.0  # opcheck compares outputs with allclose, which NaN would fail spuriously
    embed.requires_grad_()
    visual.requires_grad_()
    torch.library.opcheck(
        torch.ops.barnfast.merge_visual_text.default,
        (ids, embed, visual, IMAGE_TOKEN_ID),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    compiled = torch.compile(
        lambda i, e, v: merge_visual_text(
            i, e, v, IMAGE_TOKEN_ID, backend="triton", num_image_tokens=v.shape[0]
        ),
        backend="aot_eager",
        fullgraph=True,
    )
    out = compiled(ids, embed, visual)
    out.sum().backward()
    assert torch.equal(out, merge_visual_text_ref(ids, embed, visual, IMAGE_TOKEN_ID))
    assert torch.equal(visual.grad, torch.ones_like(visual))
