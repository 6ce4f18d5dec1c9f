"""Liger patching of the decoder: off on CPU, instance-scoped, checkpoint-compatible, equal on CUDA."""

import copy
import re
import types

import pytest
import torch

from barnfast import optional
from barnfast.models.liger import DecoderKernels, apply_liger_to_decoder, revert_liger
from tests.model_utils import grads, make_samples, packed, padded, tiny_model
from tests.utils import requires_cuda

N_IMAGES = [1, 0, 2, 1]
TEXT_LENGTHS = [7, 33, 12, 59]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    return loss.detach(), grads(model)


def _assert_same(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _twin_kernels(calls: dict) -> DecoderKernels:
    """Pure-PyTorch twins of the three kernels that count their calls: the mechanism, without CUDA."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    return DecoderKernels(
        name="twin",
        rms_norm_forward=counted("norm", LlamaRMSNorm.forward),
        rms_norm_attrs=dict(offset=0.0, casting_mode="llama"),
        mlp_forward=counted("mlp", LlamaMLP.forward),
        rotary_fn=counted("rope", apply_rotary_pos_emb),
        applies_to=lambda t: True,
    )


@pytest.mark.skipif(optional.HAS_LIGER, reason="checks the no-CUDA behaviour")
def test_cpu_not_applied_model_unchanged():
    model, _ = tiny_model("llama3-tiny")
    lm = model.language_model
    samples = make_samples(model, N_IMAGES, TEXT_LENGTHS)
    model.set_trainable(projector=True, llm=True)
    keys = list(model.state_dict())
    loss0, g0 = _loss_and_grads(model, packed(samples))
    assert apply_liger_to_decoder(lm) is False
    assert list(model.state_dict()) == keys
    assert all("forward" not in m.__dict__ for m in lm.modules())  # nothing bound on any instance
    loss1, g1 = _loss_and_grads(model, packed(samples))
    assert loss1.item() == loss0.item()
    _assert_same(g0, g1)


@pytest.mark.parametrize("backbone", ["llama3-tiny", "qwen2-tiny", "mistral-tiny"])
def test_patch_is_instance_scoped_same_keys_same_math_revertible(backbone):
    """With exact twins as 'kernels', every norm/MLP/RoPE call goes through them, the numbers and the
    state_dict keys do not change, another model of the same class is untouched, and revert undoes it."""
    model, _ = tiny_model(backbone)
    other = copy.deepcopy(model)
    model.set_trainable(projector=True, llm=True)
    samples = make_samples(model, N_IMAGES, TEXT_LENGTHS)
    keys = list(model.state_dict())
    loss0, g0 = _loss_and_grads(model, packed(samples))

    calls: dict = {}
    assert apply_liger_to_decoder(model.language_model, kernels=_twin_kernels(calls)) is True
    assert list(model.state_dict()) == keys
    loss1, g1 = _loss_and_grads(model, packed(samples))
    L = len(model.language_model.layers)
    assert calls == {"norm": 2 * L + 1, "mlp": L, "rope": L}
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    _assert_same(g0, g1)
    # The padded Hugging Face path through the same instances also uses the twins.
    model(padded(samples))
    assert calls["rope"] == 2 * L

    other(packed(samples))  # a second model of the same classes: untouched
    # (its decoder: transformers 5.0's output capture leaves bound class forwards on the vision tower's layers)
    assert calls["rope"] == 2 * L and all("forward" not in m.__dict__ for m in other.language_model.modules())

    revert_liger(model.language_model)
    model(packed(samples))
    assert calls["rope"] == 2 * L and all("forward" not in m.__dict__ for m in model.language_model.modules())


def test_unsupported_family_not_applied():
    model, _ = tiny_model("llama3-tiny")
    lm = model.language_model
    lm.config.model_type = "gemma"  # a deep copy: the shared cached model is unaffected
    assert apply_liger_to_decoder(lm, kernels=_twin_kernels({})) is False
    assert all("forward" not in m.__dict__ for m in lm.modules())


@requires_cuda
@pytest.mark.skipif(
    not optional.HAS_LIGER, reason=f"liger-kernel unavailable: {optional.WHY_NOT.get('liger')}"
)
@pytest.mark.parametrize("backbone", ["llama3-tiny", "qwen2-tiny"])
def test_cuda_liger_matches_unpatched(backbone):
    """Built on CPU (and patched by build_model), moved to CUDA: Liger's kernels run and give the
    unpatched losses and gradients (fp32; Triton's reductions differ in order only)."""
    model, _ = tiny_model(backbone)
    lm = model.language_model
    assert lm.__dict__.get("_barnfast_liger") == "liger", "build_model did not patch on a CUDA machine"
    model = model.cuda()
    model.set_trainable(projector=True, llm=True)
    ref = copy.deepcopy(model)
    revert_liger(ref.language_model)
    assert list(model.state_dict()) == list(ref.state_dict())
    samples = make_samples(model, N_IMAGES, TEXT_LENGTHS)
    batch = packed(samples).to(torch.device("cuda"))
    loss_ref, g_ref = _loss_and_grads(ref, batch)

    seen = []
    h = lm.norm.register_forward_hook(
        lambda m, i, o: seen.append(o.grad_fn is not None and "LigerRMSNorm" in type(o.grad_fn).__name__)
    )
    loss, g = _loss_and_grads(model, batch)
    h.remove()
    assert seen == [True], "the final norm did not run Liger's RMSNorm"
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    _assert_same(g, g_ref, rtol=1e-4, atol=1e-6)


def apply_rotary_pos_emb(q, k, cos, sin):  # noqa: ARG001 - a module-level name the class below never calls
    raise AssertionError("not called")


def _rope_elsewhere(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    return hidden_states, None


@pytest.mark.parametrize("why", ["no module-level apply_rotary_pos_emb", "does not call apply_rotary_pos_emb"])
def test_unrecognised_attention_refused_naming_class_version_range_before_any_change(why):
    """An attention whose forward reaches RoPE some other way is refused by the probe, with the class, the
    installed transformers and the supported range in the message, and no module of the decoder is patched.
    Two ways: a forward whose globals have no ``apply_rotary_pos_emb``, and one (in this test module, which
    has that name) that never calls it."""
    model, _ = tiny_model("llama3-tiny")
    lm = model.language_model
    forward = _rope_elsewhere
    if why.startswith("no"):
        forward = types.FunctionType(_rope_elsewhere.__code__, {}, "forward", _rope_elsewhere.__defaults__)
    renamed = type("RenamedAttention", (type(lm.layers[0].self_attn),), {"forward": forward})
    for layer in lm.layers:
        layer.self_attn.__class__ = renamed
    pattern = (rf"RenamedAttention.*{why}.*transformers {re.escape(optional.transformers_version())} .*"
               rf"{re.escape(optional.TRANSFORMERS_SUPPORTED)}")
    with pytest.raises(RuntimeError, match=pattern):
        apply_liger_to_decoder(lm, kernels=_twin_kernels({}))
    assert all("forward" not in m.__dict__ for m in lm.modules()) and "_barnfast_liger" not in lm.__dict__
