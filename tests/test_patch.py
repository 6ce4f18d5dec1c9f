"""barnfast.patch: drop-in kernels for a plain Hugging Face LlavaForConditionalGeneration / LlamaForCausalLM.

Patched and unpatched models are deep copies of one seeded model, run on the same inputs in fp32; the
loss and every gradient must agree to fp32 round-off (the fused loss sums the same products in another
order, chunk by chunk), in both of HF's normalisations: mean over non-ignored targets, and sum /
``num_items_in_batch`` (the Trainer's gradient-accumulation mode).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from barnfast import optional, patch
from barnfast.models import backbones, vision

VOCAB = 32064  # llama1-tiny's 32000 + <image>, padded to 64 as llava-hf checkpoints are
IMAGE_TOKEN = 32000
TOWER = vision.from_name("clip-tiny")


def _tiny_llava(text_config=None, *, seed: int = 0) -> LlavaForConditionalGeneration:
    """A plain HF Llava (HF projector, default attention) from the tiny registry configs, seeded."""
    if text_config is None:
        text_config = backbones.from_name("llama1-tiny").text_config()
        text_config.vocab_size = VOCAB
    config = LlavaConfig(
        vision_config=TOWER.vision_config(),
        text_config=text_config,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=TOWER.feature_layer,
        vision_feature_select_strategy="default" if TOWER.drop_cls else "full",
        image_seq_length=TOWER.num_tokens,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        # HF's init leaves some tensors at 0/1 (biases, norms): perturb them so every gradient path counts.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.float()


@pytest.fixture(scope="module")
def llava():
    return _tiny_llava()


def _llava_batch(vocab: int, B: int = 2, T: int = 29, seed: int = 1):
    """input_ids (B, T), one image block per row at different places, second row padded, some labels."""
    g = torch.Generator().manual_seed(seed)
    P = TOWER.num_tokens
    ids = torch.randint(3, min(vocab, IMAGE_TOKEN) - 1, (B, T), generator=g)
    for b in range(B):
        ids[b, 1 + 3 * b : 1 + 3 * b + P] = IMAGE_TOKEN
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, -4:] = 0  # right padding
    labels = torch.where((ids == IMAGE_TOKEN) | (attention == 0), -100, ids)
    labels[:, : P // 2] = -100
    pixels = torch.randn(B, 3, TOWER.image_size, TOWER.image_size, generator=g)
    return dict(input_ids=ids, attention_mask=attention, pixel_values=pixels, labels=labels)


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# atol: fp32 summation-order noise of the chunked loss vs full logits. Observed up to 2e-7 on 18 of 18,816
# elements of the vision tower's patch-embedding gradient once the tiny decoders are initialised at
# 1/sqrt(width) (activations O(1), as in the real models); 1e-7 held at the former init's ~8x smaller values.
def _assert_same(loss, ref_loss, grads, ref_grads, rtol=1e-5, atol=1e-6):
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for name, g in grads.items():
        diff = (g - ref_grads[name]).abs()
        torch.testing.assert_close(
            g,
            ref_grads[name],
            rtol=rtol,
            atol=atol,
            msg=lambda m, n=name, d=diff: f"{n}: max {d.max():.3g} mean {d.mean():.3g}\n{m}",
        )


@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_llava_loss_and_grads_match_unpatched(llava, num_items_in_batch):
    ref, model = copy.deepcopy(llava), copy.deepcopy(llava)
    applied = patch.apply_barnfast_kernels(model, backend="torch")
    assert applied == {"projector": True, "fused_linear_cross_entropy": True, "liger": optional.HAS_LIGER}
    assert isinstance(model.model.multi_modal_projector, patch.ProjectorMLP)
    batch = _llava_batch(VOCAB)
    kw = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    ref_out, ref_grads = _loss_and_grads(ref, batch, **kw)
    out, grads = _loss_and_grads(model, batch, **kw)
    assert type(out) is type(ref_out) and out.logits is None and ref_out.logits is not None
    # Every field the installed release declares and fills comes back (past_key_values or cache, the image
    # features as image_hidden_states or image_outputs), except the logits the fused loss never builds.
    assert set(out.keys()) == set(ref_out.keys()) - {"logits"} and any(k.startswith("image_") for k in out.keys())
    _assert_same(out.loss, ref_out.loss, grads, ref_grads)
    assert grads["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0


def test_num_items_in_batch_changes_the_normaliser(llava):
    """sum / num_items_in_batch, not the per-call mean: the two losses differ by count / num_items."""
    model = copy.deepcopy(llava)
    patch.apply_barnfast_kernels(model, backend="torch")
    batch = _llava_batch(VOCAB)
    count = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        mean = model(**batch).loss
        scaled = model(**batch, num_items_in_batch=4 * count).loss
    torch.testing.assert_close(scaled, mean / 4, rtol=1e-6, atol=0)


@pytest.mark.parametrize("num_items_in_batch", [None, 50])
def test_llama_causal_lm_loss_and_grads_match_unpatched(num_items_in_batch):
    lm = backbones.from_name("llama1-tiny").load_model(seed=0)
    ref, model = lm, copy.deepcopy(lm)
    applied = patch.apply_barnfast_kernels(model, backend="torch")
    assert applied == {"projector": False, "fused_linear_cross_entropy": True, "liger": optional.HAS_LIGER}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 32000, (3, 21), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100
    labels[2, 15:] = -100
    batch = dict(input_ids=ids, labels=labels)
    kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    ref_out, ref_grads = _loss_and_grads(ref, batch, **kw)
    out, grads = _loss_and_grads(model, batch, **kw)
    assert type(out) is type(ref_out) and out.logits is None
    _assert_same(out.loss, ref_out.loss, grads, ref_grads)

    # shift_labels (context-parallel callers pass targets already shifted) and return_dict=False.
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        ref_loss = ref(input_ids=ids, labels=labels).loss
        loss_shift = model(input_ids=ids, labels=labels, shift_labels=shift).loss
        as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(loss_shift, ref_loss, rtol=1e-5, atol=0)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], ref_loss, rtol=1e-5, atol=0)


def test_triton_backend_under_interpreter():
    """Both Triton kernels (projector, fused CE) in the patched forward; small awkward vocabulary."""
    text = LlamaConfig(
        vocab_size=IMAGE_TOKEN + 59,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    base = _tiny_llava(text, seed=2)
    ref, model = base, copy.deepcopy(base)
    patch.apply_barnfast_kernels(model, backend="triton", liger=False)
    assert model.model.multi_modal_projector.backend == "triton"
    batch = _llava_batch(text.vocab_size, T=23, seed=4)
    ref_out, ref_grads = _loss_and_grads(ref, batch, num_items_in_batch=torch.tensor(30))
    out, grads = _loss_and_grads(model, batch, num_items_in_batch=torch.tensor(30))
    _assert_same(out.loss, ref_out.loss, grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_logits_without_labels_are_the_models_own(llava):
    ref, model = copy.deepcopy(llava), copy.deepcopy(llava)
    patch.apply_barnfast_kernels(model, backend="torch")
    batch = _llava_batch(VOCAB)
    del batch["labels"]
    with torch.no_grad():
        want = ref(**batch).logits
        got = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
    assert got.shape == (2, 29, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the projector kernel is the only change
    torch.testing.assert_close(last, want[:, -1:], rtol=1e-5, atol=1e-6)


def test_revert_restores_modules_forward_and_state_dict(llava):
    model = copy.deepcopy(llava)
    projector = model.model.multi_modal_projector
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    patch.apply_barnfast_kernels(model, backend="torch")
    assert "forward" in model.__dict__
    # Same keys, same storage: the kernels hold the original Parameters, nothing is copied or renamed.
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    with pytest.raises(ValueError, match="already patched"):
        patch.apply_barnfast_kernels(model)
    patch.revert_barnfast_kernels(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is LlavaForConditionalGeneration.forward
    assert model.model.multi_modal_projector is projector and type(projector) is LlavaMultiModalProjector
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    out = model(**_llava_batch(VOCAB))
    assert out.logits is not None and out.loss is not None
    patch.revert_barnfast_kernels(model)  # unpatched: a no-op


def test_deepcopy_of_patched_model_runs_on_the_copy(llava):
    model = copy.deepcopy(llava)
    patch.apply_barnfast_kernels(model, backend="torch")
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)  # the copy's weights, not the original's, must give its loss
        batch = _llava_batch(VOCAB)
        assert not torch.equal(twin(**batch).loss, model(**batch).loss)


def test_unsupported_models_raise():
    class Other(torch.nn.Module):
        config = LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)

    with pytest.raises(ValueError, match="not LlavaForConditionalGeneration"):
        patch.apply_barnfast_kernels(Other())


def test_custom_loss_is_refused_before_anything_changes(llava):
    model = copy.deepcopy(llava)
    projector = model.model.multi_modal_projector
    model._loss_function = lambda *a, **k: None  # a user's own loss: the fused one would silently replace it
    with pytest.raises(ValueError, match="custom loss"):
        patch.apply_barnfast_kernels(model)
    assert model.model.multi_modal_projector is projector and "forward" not in model.__dict__
    assert patch.apply_barnfast_kernels(model, fused_linear_cross_entropy=False, liger=False)["projector"]


def test_save_pretrained_round_trip_after_patching(llava, tmp_path):
    model = copy.deepcopy(llava)
    patch.apply_barnfast_kernels(model, backend="torch")
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded.model.multi_modal_projector) is LlavaMultiModalProjector  # a plain HF checkpoint
    assert loaded.state_dict().keys() == model.state_dict().keys()
    batch = _llava_batch(VOCAB)
    with torch.no_grad():
        want = model(**batch).loss
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        want_logits = model(**no_labels).logits
        torch.testing.assert_close(loaded(**batch).loss, want, rtol=1e-5, atol=0)
        torch.testing.assert_close(loaded(**no_labels).logits, want_logits, rtol=1e-5, atol=1e-6)
        patch.apply_barnfast_kernels(loaded, backend="torch")
        torch.testing.assert_close(loaded(**batch).loss, want, rtol=1e-6, atol=0)


@pytest.mark.skipif(not optional.HAS_LIGER, reason=f"Liger: {optional.WHY_NOT.get('liger')}")
def test_liger_applied_and_reverted_on_cuda(llava):
    model = copy.deepcopy(llava).cuda()
    assert patch.apply_barnfast_kernels(model)["liger"]
    assert "forward" in model.model.language_model.layers[0].mlp.__dict__
    patch.revert_barnfast_kernels(model)
    assert "forward" not in model.model.language_model.layers[0].mlp.__dict__


def _synthetic_dataset(tmp_path, tokenizer, n: int):
    from barnfast.data import synthetic
    from barnfast.data.chat import encode_conversation

    root = tmp_path / "data"
    synthetic.generate(
        root, num_stage1=n, num_stage2=0, num_eval=0, image_size=TOWER.image_size, seed=0, progress=False
    )
    import PIL.Image

    items = []
    for rec in json.loads((root / "stage1.json").read_text()):
        ids, labels = encode_conversation(
            tokenizer,
            "plain",
            rec["conversations"],
            image_token_id=IMAGE_TOKEN,
            num_image_tokens=TOWER.num_tokens,
        )
        with PIL.Image.open(root / rec["image"]) as img:
            pixels = TOWER.preprocess(img.convert("RGB"))
        items.append(dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), pixel_values=pixels))
    return items


def _collate(items, pad_id: int = 0):
    T = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
    return dict(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        pixel_values=torch.stack([x["pixel_values"] for x in items]),
    )


def _train(model, data, out_dir):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_collate)
    result = trainer.train()
    return result, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_runs_patched_model(llava, tmp_path, monkeypatch):
    """3 steps x 2 micro-batches of the HF Trainer on synthetic data: the fused loss runs with the Trainer's
    num_items_in_batch, and the logged losses match an unpatched model trained the same way."""
    tokenizer = backbones.from_name("llama1-tiny").load_tokenizer()
    data = _synthetic_dataset(tmp_path, tokenizer, n=12)
    ref, model = copy.deepcopy(llava), copy.deepcopy(llava)
    patch.apply_barnfast_kernels(model, backend="torch")

    calls = []
    real = patch._fused_linear_cross_entropy

    def spy(hidden, weight, target, **kw):
        calls.append(kw["num_target_tokens"])
        return real(hidden, weight, target, **kw)

    monkeypatch.setattr(patch, "_fused_linear_cross_entropy", spy)
    before = model.lm_head.weight.detach().clone()
    result, losses = _train(model, data, tmp_path / "patched")
    assert len(calls) == 3 * 2  # 3 optimizer steps x 2 micro-batches, all through the fused loss
    # The Trainer found **kwargs in the (wrapped) signature and passed each step's global target count.
    assert all(isinstance(c, torch.Tensor) and c > 0 for c in calls)
    assert torch.isfinite(torch.tensor(result.training_loss)) and len(losses) == 3
    assert not torch.equal(before, model.lm_head.weight.detach())

    _, ref_losses = _train(ref, data, tmp_path / "unpatched")
    # Logged losses are rounded by the Trainer (4 significant digits); the weights must agree much tighter.
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight, rtol=1e-4, atol=1e-6)


def _version_and_range() -> str:
    return rf"transformers {re.escape(optional.transformers_version())} .*{re.escape(optional.TRANSFORMERS_SUPPORTED)}"


def test_output_field_the_decoder_lacks_is_refused_naming_class_version_range(llava, monkeypatch):
    """A release whose output class declares a field the decoder output does not have (here: an extra
    ``router_logits``) would lose it silently: the patched forward raises naming it instead."""

    @dataclasses.dataclass
    class WithRouterLogits(patch.LlavaCausalLMOutputWithPast):
        router_logits: torch.Tensor | None = None

    model = copy.deepcopy(llava)
    patch.apply_barnfast_kernels(model, backend="torch")
    monkeypatch.setattr(patch, "_output_class", lambda m: WithRouterLogits)
    with pytest.raises(RuntimeError, match=rf"LlavaForConditionalGeneration.*router_logits.*{_version_and_range()}"):
        model(**_llava_batch(VOCAB))


def test_forward_without_kwargs_is_refused_before_anything_changes():
    """The patched forward binds the class forward's signature and passes **kwargs on (num_items_in_batch):
    a forward without them is not patched, and the message names the class, the version and the range."""
    lm = backbones.from_name("llama1-tiny").load_model(seed=0)

    class NoKwargs(type(lm)):
        def forward(self, input_ids=None, labels=None):
            return super().forward(input_ids=input_ids, labels=labels)

    lm.__class__ = NoKwargs
    with pytest.raises(RuntimeError, match=rf"NoKwargs\.forward.*{_version_and_range()}"):
        patch.apply_barnfast_kernels(lm, backend="torch")
    assert "forward" not in lm.__dict__ and patch._STATE not in lm.__dict__


def test_out_of_range_transformers_warns_once_naming_version_and_range(llava, monkeypatch, caplog):
    monkeypatch.setattr(optional, "transformers_version", lambda: "5.99.0")
    monkeypatch.setattr(optional, "_WARNED_RANGE", False)
    with caplog.at_level("WARNING", logger="barnfast.optional"):
        patch.apply_barnfast_kernels(copy.deepcopy(llava), backend="torch")
        patch.apply_barnfast_kernels(copy.deepcopy(llava), backend="torch")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "5.99.0" in warnings[0] and optional.TRANSFORMERS_SUPPORTED in warnings[0]
