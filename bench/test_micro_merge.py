"""Visual-text merge of a packed micro-batch, forward + backward as in stage 2 (the table is trained).

Micro-batch of ``bench.bench_merge_visual_text``: 16 LLaVA-665k-like samples, 15 with a 576-token image;
table: llama2's 32000 rows + ``<image>`` x 4096 on CUDA, x 256 on CPU. Providers: barnfast (Triton on
CUDA, passing the image-token count the trainer knows), the reference (embedding + masked_scatter) eager
and under torch.compile, and LLaVA's per-sample loop re-implemented in the bench module. Bytes moved
(``extra_info["gbytes"]``): 2*T*H*bytes forward and again backward; the (V, H) zero fill is extra.
"""

import pytest
import torch
from barnfast.kernels import merge_visual_text, merge_visual_text_ref

from barnfast.models import backbones, vision
from bench.bench_merge_visual_text import llava_ids, llava_loop, make_micro_batch, packed_ids
from bench.conftest import CUDA, DEVICE, DTYPE

LLM, TOWER = backbones.from_name("llama2"), vision.from_name("clip-l-336")
HIDDEN = LLM.hidden_size if CUDA else 256
_compiled_ref = torch.compile(merge_visual_text_ref)


@pytest.mark.parametrize("provider", ["barnfast", "torch eager", "torch.compile", "llava loop"])
def test_merge_fwd_bwd_stage2(measure, provider):
    if provider == "barnfast" and not CUDA:
        pytest.skip("on CPU barnfast's backend='auto' runs the eager reference (the 'torch eager' row)")
    vocab, n_tok = LLM.vocab_size, TOWER.num_tokens
    image_token_id = vocab
    samples = make_micro_batch(vocab, n_tok)
    ids = packed_ids(samples, image_token_id, n_tok).to(DEVICE)
    n_images = sum(s[1] for s in samples)
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(vocab + 1, HIDDEN, generator=g).to(DEVICE, DTYPE).requires_grad_()
    visual = torch.randn(n_images * n_tok, HIDDEN, generator=g).to(DEVICE, DTYPE).requires_grad_()
    if provider == "llava loop":
        per_sample = [i.to(DEVICE) for i in llava_ids(samples)]
        fn = lambda: llava_loop(per_sample, embed, visual.view(n_images, n_tok, HIDDEN))  # noqa: E731
    elif provider == "barnfast":
        fn = lambda: merge_visual_text(ids, embed, visual, image_token_id, num_image_tokens=visual.shape[0])  # noqa: E731
    else:
        ref = merge_visual_text_ref if provider == "torch eager" else _compiled_ref
        fn = lambda: ref(ids, embed, visual, image_token_id)  # noqa: E731
    dy = torch.randn(fn().shape, generator=g).to(DEVICE, DTYPE)  # the loop's output is padded (B, L, H)

    def step():
        embed.grad = visual.grad = None
        fn().backward(dy)

    T = ids.shape[0]
    measure(step, group=f"merge fwd+bwd stage 2, T={T}, table {vocab + 1}x{HIDDEN}", provider=provider,
            gbytes=2 * 2 * T * HIDDEN * embed.element_size() / 1e9)
