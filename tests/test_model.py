"""Packed training forward: equal to per-sample and padded computation; export loads in transformers."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from barnfast.models.export import export_hf
from tests.model_utils import grads, make_samples, packed, padded, tiny_model

N_IMAGES = [1, 0, 3, 1, 2]  # text-only sample, several images in a row
TEXT_LENGTHS = [5, 40, 9, 120, 17]  # very different lengths


@pytest.fixture(params=["llama1-tiny", "llama3-tiny"])
def setup(request):
    model, tok = tiny_model(request.param)
    model.set_trainable(projector=True, llm=True)
    model.tokenizer = tok  # for the export test
    return model, make_samples(model, N_IMAGES, TEXT_LENGTHS)


def _check_grads(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_packed_equals_per_sample(setup):
    model, samples = setup
    full = packed(samples)
    N = full.num_targets.float()
    loss = model(full, N)
    loss.backward()
    g_packed = grads(model)
    logits_packed = model.logits(full)
    model.zero_grad(set_to_none=True)

    total, start = 0.0, 0
    for i in range(len(N_IMAGES)):
        one = packed(samples, [i])
        l_i = model(one, N)
        l_i.backward()
        total += l_i.item()
        T = one.num_tokens
        torch.testing.assert_close(logits_packed[start:start + T], model.logits(one), rtol=1e-4, atol=1e-5)
        start += T
    assert loss.item() == pytest.approx(total, rel=1e-5)
    _check_grads(g_packed, grads(model))


def test_packed_equals_padded_llava_way(setup):
    model, samples = setup
    loss_p = model(packed(samples))
    loss_p.backward()
    g_p = grads(model)
    model.zero_grad(set_to_none=True)
    loss_pad = model(padded(samples, pad_id=0))
    loss_pad.backward()
    assert loss_p.item() == pytest.approx(loss_pad.item(), rel=1e-5)
    _check_grads(g_p, grads(model))


def test_one_vs_four_micro_batches_same_step(setup):
    """The global target count as normaliser makes the split invisible to loss and gradients."""
    model, samples = setup
    full = packed(samples)
    N = full.num_targets.float()
    model(full, N).backward()
    g1 = grads(model)
    model.zero_grad(set_to_none=True)
    parts = [[0], [1, 2], [3], [4]]
    total = sum(packed(samples, p).num_targets for p in parts)
    assert total == N
    for p in parts:
        model(packed(samples, p), N).backward()
    _check_grads(g1, grads(model))


def test_export_loads_in_transformers_with_same_logits(setup, tmp_path):
    model, samples = setup
    dest = export_hf(model, model.tokenizer, tmp_path / "export")
    hf = LlavaForConditionalGeneration.from_pretrained(dest).eval()
    for i in (0, 2):
        one = packed(samples, [i])
        ours = model.logits(one)
        with torch.no_grad():
            theirs = hf(input_ids=one.input_ids[None], pixel_values=one.pixel_values).logits[0]
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (dest / "tokenizer_config.json").exists() and (dest / "preprocessor_config.json").exists()
