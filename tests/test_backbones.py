"""Backbone registry: real facts, tiny twins (tokenizer layout, forward, determinism), offline errors,
loading a real entry from a local folder."""

from __future__ import annotations

import pytest
import torch
import transformers

from barnfast.models.backbones import BACKBONES, BackboneUnavailableError, from_name

REAL = [n for n, b in BACKBONES.items() if not b.tiny]
TINY = [n for n, b in BACKBONES.items() if b.tiny]

# name: (hf_id, vocab, hidden, intermediate, layers, heads, kv heads, rope base, context, template)
FACTS = {
    "llama1": ("huggyllama/llama-7b", 32000, 4096, 11008, 32, 32, 32, 1e4, 2048, "vicuna_v1"),
    "llama2": ("meta-llama/Llama-2-7b-hf", 32000, 4096, 11008, 32, 32, 32, 1e4, 4096, "llama_2"),
    "vicuna": ("lmsys/vicuna-7b-v1.5", 32000, 4096, 11008, 32, 32, 32, 1e4, 4096, "vicuna_v1"),
    "llama2-chat": ("meta-llama/Llama-2-7b-chat-hf", 32000, 4096, 11008, 32, 32, 32, 1e4, 4096, "llama_2"),
    "llama3": ("meta-llama/Meta-Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 5e5, 8192, "llama_3"),
    "llama3-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", 128256, 4096, 14336, 32, 32, 8, 5e5, 8192, "llama_3"),
    "llama3.1": ("meta-llama/Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, 5e5, 131072, "llama_3_1"),
    "llama3.1-instruct": ("meta-llama/Llama-3.1-8B-Instruct", 128256, 4096, 14336, 32, 32, 8, 5e5, 131072,
                          "llama_3_1"),
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.2", 32000, 4096, 14336, 32, 32, 8, 1e6, 32768, "mistral"),
    "qwen2": ("Qwen/Qwen2-7B-Instruct", 152064, 3584, 18944, 28, 28, 4, 1e6, 32768, "chatml"),
}
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SP_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x00>": 3, "<0x0A>": 13, "<0xFF>": 258}
LLAMA3_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
    "<|reserved_special_token_0|>": 128002,
}
# Layout of each tiny tokenizer: (len, ids of named tokens, pad id)
TOKENIZERS = {
    "llama1": (32000, SP_IDS, 0),
    "llama2": (32000, SP_IDS, 0),
    "vicuna": (32000, SP_IDS, 0),
    "mistral": (32000, SP_IDS, 0),
    "llama3": (
        128256,
        {
            **LLAMA3_IDS,
            "<|reserved_special_token_2|>": 128004,
            "<|reserved_special_token_4|>": 128008,
            "<|reserved_special_token_250|>": 128255,
        },
        128004,
    ),
    "llama3.1": (
        128256,
        {
            **LLAMA3_IDS,
            "<|finetune_right_pad_id|>": 128004,
            "<|eom_id|>": 128008,
            "<|python_tag|>": 128010,
            "<|reserved_special_token_247|>": 128255,
        },
        128004,
    ),
    # The real Qwen2 tokenizer has 151646 entries under a 152064-row embedding.
    "qwen2": (151646, {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}, 151643),
}


def test_registry_has_required_entries_each_with_a_tiny_twin():
    assert set(FACTS) == set(REAL)
    for name in REAL:
        twin = BACKBONES[name].tiny_twin
        assert twin == f"{name}-tiny" and BACKBONES[twin].tiny and BACKBONES[twin].tiny_twin == twin
    assert len(TINY) == len(REAL)


@pytest.mark.parametrize("name", REAL)
def test_real_facts_and_config(name):
    b = from_name(name)
    hf_id, vocab, hidden, inter, layers, heads, kv, theta, ctx, template = FACTS[name]
    got = (
        b.hf_id,
        b.vocab_size,
        b.hidden_size,
        b.intermediate_size,
        b.num_hidden_layers,
        b.num_attention_heads,
        b.num_key_value_heads,
        b.rope_theta,
        b.max_position_embeddings,
        b.chat_template,
    )
    assert got == FACTS[name]
    assert b.rope_scaling == (LLAMA31_ROPE if name.startswith("llama3.1") else None)
    cfg = b.text_config()
    assert cfg.model_type == b.family
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads, cfg.max_position_embeddings) == (
        vocab,
        hidden,
        kv,
        ctx,
    )
    assert cfg.rope_parameters["rope_theta"] == theta
    if name.startswith("llama3.1"):
        assert {k: cfg.rope_parameters[k] for k in LLAMA31_ROPE} == LLAMA31_ROPE
    else:
        assert cfg.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("name", REAL)
def test_tiny_twin_keeps_family_facts(name):
    real, tiny = from_name(name), from_name(f"{name}-tiny")
    for field in (
        "family",
        "vocab_size",
        "rope_theta",
        "rope_scaling",
        "max_position_embeddings",
        "tie_word_embeddings",
        "chat_template",
        "bos_token",
        "eos_token",
        "pad_token",
        "stop_tokens",
        "tokenizer_kind",
        "rms_norm_eps",
    ):
        assert getattr(tiny, field) == getattr(real, field), field
    assert (
        tiny.num_attention_heads / tiny.num_key_value_heads
        == real.num_attention_heads / real.num_key_value_heads
    )
    assert tiny.hf_id is None and tiny.head_dim == 16 and tiny.num_hidden_layers == 2
    assert tiny.hidden_size <= 112


@pytest.mark.parametrize("name", REAL)
def test_tiny_tokenizer_layout(name):
    b = from_name(f"{name}-tiny")
    size, ids, pad_id = TOKENIZERS[name.removesuffix("-chat").removesuffix("-instruct")]
    tok = b.load_tokenizer()
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert len(tok) == size
    for token, tid in ids.items():
        assert tok.convert_tokens_to_ids(token) == tid, token
    assert tok.pad_token == b.pad_token and tok.pad_token_id == pad_id
    cfg = b.text_config()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    )
    for stop in b.stop_tokens:  # each stop token is one special token, never split
        assert tok.encode(stop, add_special_tokens=False) == [tok.convert_tokens_to_ids(stop)]
    # The synthetic dataset's words are a few tokens each, and text round-trips (byte fallback too).
    text = "What colour is the shape? A small red circle at the top left; two blue squares. é✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode("What colour is the shape?", add_special_tokens=False)) <= 6
    # BOS is added by encode() where the family has one.
    assert (tok.encode("red")[0] == tok.bos_token_id) == (b.bos_token is not None)
    # <image> appended as a special token takes id len(tok); a later tokenizer is unaffected.
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == size
    assert tok.encode("a<image>b", add_special_tokens=False)[1] == size
    assert len(b.load_tokenizer()) == size


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_and_seeded_weights(name):
    b = from_name(name)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m0 = b.load_model(seed=0)
    assert torch.equal(torch.rand(1), before), "load_model must not consume the caller's RNG"
    m0b, m1 = b.load_model(seed=0), b.load_model(seed=1)
    sd0, sd0b, sd1 = m0.state_dict(), m0b.state_dict(), m1.state_dict()
    assert all(torch.equal(sd0[k], sd0b[k]) for k in sd0)
    assert not torch.equal(sd0["model.embed_tokens.weight"], sd1["model.embed_tokens.weight"])
    assert m0.config.vocab_size == b.vocab_size == m0.get_input_embeddings().weight.shape[0]
    assert m0.config.num_key_value_heads == b.num_key_value_heads
    x = torch.randint(0, b.vocab_size, (2, 7))
    with torch.no_grad():
        logits = m0(input_ids=x).logits
    assert logits.shape == (2, 7, b.vocab_size) and torch.isfinite(logits).all()
    assert b.load_model(seed=0, dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_unknown_name_lists_every_known_name():
    with pytest.raises(ValueError) as e:
        from_name("llama4")
    for name in BACKBONES:
        assert repr(name)[1:-1] in str(e.value)
    assert "'llama4'" in str(e.value)


@pytest.mark.parametrize("name", ["llama3", "vicuna"])
def test_real_backbone_offline_error(name, monkeypatch):
    monkeypatch.delenv("BARNFAST_ALLOW_DOWNLOAD", raising=False)
    b = from_name(name)
    for load in (b.load_model, b.load_tokenizer):
        with pytest.raises(BackboneUnavailableError) as e:
            load()
        msg = str(e.value)
        assert "--model-path" in msg and f"{name}-tiny" in msg and b.hf_id in msg
        assert "BARNFAST_ALLOW_DOWNLOAD=1" in msg
    with pytest.raises(BackboneUnavailableError, match="not a folder"):
        b.load_model(model_path="/nonexistent/barnfast-model")


def test_real_entry_loads_local_folder(tmp_path):
    tiny = from_name("llama3-tiny")
    model, tok = tiny.load_model(seed=3), tiny.load_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    real = from_name("llama3")
    loaded, tok2 = real.load_model(model_path=str(tmp_path)), real.load_tokenizer(model_path=str(tmp_path))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert len(tok2) == 128256 and tok2.pad_token_id == 128004
    text = "How many shapes are there?"
    assert tok2.encode(text) == tok.encode(text)
    # A folder of another family is refused rather than silently trained under the wrong name.
    with pytest.raises(ValueError, match="'llama'"):
        from_name("qwen2").load_model(model_path=str(tmp_path))


def test_base_and_tuned_variants_of_each_generation():
    """Like with like: each generation has a base entry and a chat/instruct one, equal but for the weights."""
    for base, tuned, kind in (("llama2", "llama2-chat", "chat"), ("llama3", "llama3-instruct", "instruct"),
                              ("llama3.1", "llama3.1-instruct", "instruct")):
        b, t = from_name(base), from_name(tuned)
        assert (b.variant, t.variant) == ("base", kind) and b.hf_id != t.hf_id
        assert b.text_config().to_dict() == t.text_config().to_dict()
        assert from_name(f"{tuned}-tiny").tiny and from_name(f"{tuned}-tiny").variant == kind
