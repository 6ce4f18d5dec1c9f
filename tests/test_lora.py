"""LoRA: only adapters (and the projector) train; merged model = LoRA model; merged export loads in transformers."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from barnfast.errors import ConfigError
from barnfast.models.export import export_hf
from barnfast.training.lora import LoraConfig, apply_lora, lora_state_dict, merge_lora
from tests.model_utils import make_samples, packed, tiny_model

N_IMAGES = [1, 0, 2]
TEXT_LENGTHS = [7, 33, 12]


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", 2.5), ("alpha", 0), ("dropout", 1.0), ("dropout", -0.1),
    ("target_modules", ()), ("target_modules", "q_proj"), ("target_modules", ("q_proj", "")),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"lora.{field}"):
        LoraConfig(**{field: value})


def test_config_takes_a_list_of_targets():
    assert LoraConfig(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")


def test_unknown_target_modules_name_the_field():
    model, _ = tiny_model("llama3-tiny")
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(model, LoraConfig(target_modules=("no_such_proj",)))


def test_only_adapters_and_projector_train():
    model, _ = tiny_model("llama3-tiny")
    model.set_trainable(projector=True, llm=True)
    cfg = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    n = apply_lora(model, cfg)
    trainable = {name: p for name, p in model.hf.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if ".lora_" in name}
    projector = {name for name in trainable if name.startswith("model.multi_modal_projector.")}
    assert projector == {f"model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert set(trainable) == lora | projector
    assert all(".language_model.layers." in name for name in lora)  # not the vision tower, not the projector
    expected = sum(cfg.rank * (lin.in_features + lin.out_features)
                   for layer in model.language_model.layers
                   for lin in (layer.self_attn.q_proj.base_layer, layer.self_attn.v_proj.base_layer,
                               layer.mlp.down_proj.base_layer))
    assert n == expected == sum(trainable[name].numel() for name in lora)
    assert set(lora_state_dict(model)) == lora
    assert not model.lm_head.weight.requires_grad
    with pytest.raises(RuntimeError, match="already has LoRA"):
        apply_lora(model, cfg)


def test_lora_trains_merges_and_exports(tmp_path):
    model, tok = tiny_model("llama3-tiny")
    model.set_trainable(projector=False, llm=False)
    samples = make_samples(model, N_IMAGES, TEXT_LENGTHS)
    batch = packed(samples)
    base_keys = list(model.hf.state_dict().keys())
    base = {k: v.clone() for k, v in model.hf.state_dict().items()}

    apply_lora(model, LoraConfig(rank=8, alpha=16, dropout=0.1))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    state = model.hf.state_dict()
    for k, v in base.items():  # base weights frozen: only the adapters moved
        key = k.replace(".weight", ".base_layer.weight") if k not in state else k
        assert torch.equal(state[key], v), k
    assert all(v.abs().max() > 0 for k, v in lora_state_dict(model).items() if ".lora_B." in k)

    model.eval()  # no adapter dropout: the LoRA model is a deterministic function to compare with
    one = packed(samples, [0])
    lora_logits = model.logits(batch)
    merge_lora(model)
    assert list(model.hf.state_dict().keys()) == base_keys
    assert not lora_state_dict(model)
    merged_logits = model.logits(batch)
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-5, atol=1e-5)
    # The merge did change the model (the comparison above is not base vs base).
    merged_q = model.language_model.layers[0].self_attn.q_proj.weight
    assert (merged_q - base["model.language_model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-4

    dest = export_hf(model, tok, tmp_path / "export")
    hf = LlavaForConditionalGeneration.from_pretrained(dest).eval()
    ours = model.logits(one)
    with torch.no_grad():
        theirs = hf(input_ids=one.input_ids[None], pixel_values=one.pixel_values).logits[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
