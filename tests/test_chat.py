"""Chat templates on the tiny tokenizers: rendered text, labels, image slots, prompts, SampleErrors."""

from __future__ import annotations

import functools

import pytest

from barnfast.data.chat import (
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    count_image_placeholders,
    encode_conversation,
    encode_prompt,
)
from barnfast.errors import SampleError
from barnfast.models.backbones import from_name

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
    {"from": "gpt", "value": "Red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "Two"},
]
CAPTION = [
    {"from": "human", "value": "Describe the image.\n<image>"},
    {"from": "gpt", "value": "A red circle."},
]
LLAVA_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
H3 = "<|start_header_id|>{}<|end_header_id|>\n\n"
# template: (tiny backbone, rendered text of CONV without BOS, answers as labelled text incl. end token)
CASES = {
    "vicuna_v1": (
        "vicuna-tiny",
        f"{VICUNA_SYS} USER: <image>\nWhat colour is the shape? ASSISTANT: Red</s>"
        "USER: How many shapes are there? ASSISTANT: Two</s>",
        [" Red</s>", " Two</s>"],
    ),
    "llama_2": (
        "llama2-tiny",
        f"[INST] <<SYS>>\n{LLAVA_SYS}\n<</SYS>>\n\n<image>\nWhat colour is the shape? [/INST] Red </s>"
        "<s>[INST] How many shapes are there? [/INST] Two </s>",
        [" Red </s>", " Two </s>"],
    ),
    "llama_3": (
        "llama3-tiny",
        f"{H3.format('system')}{LLAVA_SYS}<|eot_id|>{H3.format('user')}<image>\nWhat colour is the shape?"
        f"<|eot_id|>{H3.format('assistant')}Red<|eot_id|>"
        f"{H3.format('user')}How many shapes are there?<|eot_id|>"
        f"{H3.format('assistant')}Two<|eot_id|>",
        ["Red<|eot_id|>", "Two<|eot_id|>"],
    ),
    "mistral": (
        "mistral-tiny",
        "[INST] <image>\nWhat colour is the shape? [/INST] Red</s>"
        "[INST] How many shapes are there? [/INST] Two</s>",
        [" Red</s>", " Two</s>"],
    ),
    "chatml": (
        "qwen2-tiny",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nRed<|im_end|>\n"
        "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\nTwo<|im_end|>\n",
        ["Red<|im_end|>", "Two<|im_end|>"],
    ),
}


@functools.cache
def _tok(backbone: str):
    """The tiny tokenizer with <image> appended (id len(tokenizer)), as the trainer sets it up."""
    tok = from_name(backbone).load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return tok


def _image_id(tok) -> int:
    return tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def llava_chunk_ids(tok, rendered: str) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` without the BOS: every chunk around ``<image>`` its own call."""
    out = []
    for i, chunk in enumerate(rendered.split(IMAGE_PLACEHOLDER)):
        out += ([_image_id(tok)] if i else []) + tok.encode(chunk, add_special_tokens=False)
    return out


def _runs(ids, labels):
    """Contiguous labelled spans, as lists of ids."""
    out, cur = [], []
    for i, l in zip(ids, labels):
        if l == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            assert l == i, "a label differs from its input id"
            cur.append(i)
    return out + ([cur] if cur else [])


def test_registry_templates_exist():
    from barnfast.models.backbones import BACKBONES

    assert {b.chat_template for b in BACKBONES.values()} <= set(TEMPLATES)
    assert {"plain", "vicuna_v1", "llama_2", "llama_3"} <= set(TEMPLATES)


@pytest.mark.parametrize("template", list(CASES))
def test_template_text_and_labels(template):
    backbone, rendered, answers = CASES[template]
    tok = _tok(backbone)
    ids, labels = encode_conversation(tok, template, CONV, image_token_id=_image_id(tok), num_image_tokens=1)
    assert len(ids) == len(labels)
    has_bos = tok.bos_token_id is not None
    assert (ids[0] == tok.bos_token_id) == has_bos
    body = ids[1:] if has_bos else ids
    # Segment-by-segment ids equal LLaVA's tokenizer_image_token on the rendered string: each chunk
    # around <image> tokenized on its own (a Metaspace tokenizer starts the chunk after it with "▁").
    assert llava_chunk_ids(tok, rendered) == body
    img = _image_id(tok)
    assert tok.decode([t for t in body if t != img]).replace(" \n", "\n") == rendered.replace("<image>", "")
    # Labelled: exactly each answer and its end-of-turn token, nothing else.
    # (each answer tokenized as it reads mid-text: after a special token, hence the eos prefix)
    runs = _runs(ids, labels)
    assert runs == [tok.encode(tok.eos_token + a, add_special_tokens=False)[1:] for a in answers]
    end = {"llama_3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(template, tok.eos_token)
    assert all(r[-1] == tok.convert_tokens_to_ids(end) for r in runs)


@pytest.mark.parametrize("template", list(CASES))
@pytest.mark.parametrize("n", [1, 5])
def test_image_slots(template, n):
    tok = _tok(CASES[template][0])
    img = _image_id(tok)
    conv = [
        {"from": "human", "value": "<image> and <image>: which is red?"},
        {"from": "gpt", "value": "Left"},
    ]
    ids, labels = encode_conversation(tok, template, conv, image_token_id=img, num_image_tokens=n)
    assert count_image_placeholders(conv) == 2
    assert ids.count(img) == 2 * n
    assert all(l == -100 for i, l in zip(ids, labels) if i == img)
    first = ids.index(img)
    assert ids[first : first + n] == [img] * n


@pytest.mark.parametrize("template", list(CASES))
def test_prompt_is_prefix_of_training_ids(template):
    tok = _tok(CASES[template][0])
    img = _image_id(tok)
    ids, labels = encode_conversation(tok, template, CONV, image_token_id=img, num_image_tokens=4)
    prompt = encode_prompt(tok, template, CONV[:-1], image_token_id=img, num_image_tokens=4)
    # The prompt stops exactly where the last answer's labels begin.
    last_run_start = max(
        i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100)
    )
    assert prompt == ids[:last_run_start]
    with pytest.raises(SampleError, match="end with a human"):
        encode_prompt(tok, template, CONV, image_token_id=img, num_image_tokens=4)


@pytest.mark.parametrize("backbone", ["vicuna-tiny", "llama3-tiny", "qwen2-tiny"])
def test_plain(backbone):
    tok = _tok(backbone)
    img = _image_id(tok)
    ids, labels = encode_conversation(tok, "plain", CAPTION, image_token_id=img, num_image_tokens=3)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    assert ids[: len(bos) + 3] == bos + [img] * 3  # the human text "Describe the image." is dropped
    assert tok.decode(ids[len(bos) + 3 :]) == "A red circle.\n"
    assert labels[: len(bos) + 3] == [-100] * (len(bos) + 3) and labels[len(bos) + 3 :] == ids[len(bos) + 3 :]
    assert encode_prompt(tok, "plain", CAPTION[:1], image_token_id=img, num_image_tokens=3) == bos + [img] * 3


def test_system_override_and_role_aliases():
    tok = _tok("llama3-tiny")
    img = _image_id(tok)
    conv = [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Red"}]
    ids, labels = encode_conversation(tok, "llama_3", conv, image_token_id=img, num_image_tokens=1, system="")
    assert (
        tok.decode(ids)
        == f"<|begin_of_text|>{H3.format('user')}Hi<|eot_id|>{H3.format('assistant')}Red<|eot_id|>"
    )
    ids2, _ = encode_conversation(
        tok, "llama_3", conv, image_token_id=img, num_image_tokens=1, system="Be brief."
    )
    assert tok.decode(ids2).startswith(f"<|begin_of_text|>{H3.format('system')}Be brief.<|eot_id|>")
    tok2 = _tok("vicuna-tiny")
    ids3, _ = encode_conversation(
        tok2, "vicuna_v1", conv, image_token_id=_image_id(tok2), num_image_tokens=1, system=""
    )
    assert tok2.decode(ids3[1:]) == "USER: Hi ASSISTANT: Red</s>"


BAD = {
    "empty conversation": [],
    "no assistant turn": [{"from": "human", "value": "<image>\nHi"}],
    "first turn is not from the human": [{"from": "gpt", "value": "Red"}, {"from": "human", "value": "Hi"}],
    "do not alternate": [
        {"from": "human", "value": "Hi"},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Red"},
    ],
    "ends with a human turn": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Red"},
        {"from": "human", "value": "Hi"},
    ],
    "unknown role": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Red"}],
    "placeholder in an assistant turn": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "<image>"},
    ],
    "not text": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": None}],
    "not a": [{"from": "human"}, {"from": "gpt", "value": "Red"}],
}


@pytest.mark.parametrize("reason", list(BAD))
@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "mistral"])
def test_sample_errors(reason, template):
    tok = _tok("vicuna-tiny")
    with pytest.raises(SampleError, match=reason):
        encode_conversation(tok, template, BAD[reason], image_token_id=_image_id(tok), num_image_tokens=2)


def test_plain_sample_errors():
    tok = _tok("llama2-tiny")
    kw = dict(image_token_id=_image_id(tok), num_image_tokens=2)
    with pytest.raises(SampleError, match="no <image>"):
        encode_conversation(
            tok, "plain", [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Red"}], **kw
        )
    with pytest.raises(SampleError, match="one human turn and one caption"):
        encode_conversation(tok, "plain", CONV, **kw)


def test_bad_template_or_tokenizer():
    tok = _tok("vicuna-tiny")
    with pytest.raises(ValueError, match="unknown chat template"):
        encode_conversation(tok, "alpaca", CONV, image_token_id=_image_id(tok), num_image_tokens=1)
    with pytest.raises(ValueError, match="<\\|start_header_id\\|>"):  # llama_3 on a LLaMA-2 vocabulary
        encode_conversation(tok, "llama_3", CONV, image_token_id=_image_id(tok), num_image_tokens=1)


@pytest.mark.parametrize("system", [None, "", "Be brief."])
@pytest.mark.parametrize("template", list(CASES))
def test_exported_jinja_template_follows_the_trained_system_text(template, system):
    """The export's transformers chat template, built for a run's ``train.system_prompt`` (None: the
    template's own, ``""``: none), gives the ids barnfast trained on when the messages bring no system
    message; a system message in them replaces it, as ``encode_prompt(system=...)`` does."""
    from barnfast.models.export import hf_chat_template

    tok = _tok(CASES[template][0])
    img = _image_id(tok)
    tok.chat_template = hf_chat_template(template, system)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": "Red"},
                {"role": "user", "content": "How many shapes are there?"}]
    conv = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red"},
            {"from": "human", "value": "How many shapes are there?"}]

    def jinja_ids(msgs):
        got = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return list(got["input_ids"] if hasattr(got, "keys") else got)

    assert jinja_ids(messages) == encode_prompt(tok, template, conv, image_token_id=img, num_image_tokens=1,
                                                system=system)
    override = [{"role": "system", "content": "Answer in one word."}, *messages]
    assert jinja_ids(override) == encode_prompt(tok, template, conv, image_token_id=img, num_image_tokens=1,
                                                system="Answer in one word.")
    if system is not None and template != "llama_3_1":  # 3.1's system block is always there
        default = encode_prompt(tok, template, conv, image_token_id=img, num_image_tokens=1)
        assert (jinja_ids(messages) == default) == (system == TEMPLATES[template].default_system)
