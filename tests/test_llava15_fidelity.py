"""LLaVA-1.5, token for token (issue 16): the llava15 recipe against haotian-liu/LLaVA and LLaVA-MORE.

Expected token streams are written out by hand below, as the tiny tokenizers' pieces (``▁`` a
SentencePiece space, ``<0x0A>`` a SentencePiece newline (LLaMA's byte fallback: no piece holds one),
``Ġ``/``Ċ`` byte-level space/newline, ``+`` a
labelled token): what LLaVA's preprocessing gives (``preprocess_multimodal`` moves ``<image>`` to the
start of its turn; ``tokenizer_image_token`` tokenizes each chunk around ``<image>`` on its own, so a
SentencePiece chunk ends with a lone ``▁`` before the image and the next one starts with ``▁``; one
BOS; the answer and its end token labelled). Two independent oracles back them up on many samples:
LLaVA's own rendering + chunked tokenization re-written from its code (ids), and transformers' cosine
schedule (the LR). Also: image preprocessing per stage on non-square photos, the 2,048-token
truncation, empty answers skipped, special-token text in the data tokenized as text.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from barnfast.config import load_recipe
from barnfast.data.chat import IMAGE_PLACEHOLDER, encode_conversation, move_images_to_turn_start
from barnfast.data.dataset import StageDataset, truncate
from barnfast.data.llava import Sample
from barnfast.errors import SampleError
from barnfast.models import vision
from barnfast.models.backbones import from_name
from barnfast.training.trainer import lr_at

BACKBONE = {"vicuna_v1": "vicuna-tiny", "llama_2": "llama2-tiny", "llama_3": "llama3-tiny",
            "llama_3_1": "llama3.1-tiny", "plain": "vicuna-tiny"}
TEMPLATES = ["vicuna_v1", "llama_2", "llama_3", "llama_3_1"]


@functools.cache
def _tok(backbone: str):
    tok = from_name(backbone).load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return tok


def _img(tok) -> int:
    return tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def stream(tok, ids, labels) -> str:
    """Readable tokens: ``+`` before a labelled one (its label must equal its id), newlines as ``\\n``."""
    out = []
    for t, i, lab in zip(tok.convert_ids_to_tokens(ids), ids, labels):
        assert lab in (-100, i), f"label {lab} of token {t!r} is neither -100 nor its id {i}"
        out.append(("+" if lab != -100 else "") + t.replace("\n", "\\n"))
    return " ".join(out)


def H(v):  # noqa: N802 - reads like the data
    return {"from": "human", "value": v}


def G(v):  # noqa: N802
    return {"from": "gpt", "value": v}


# -- the cases, and their token streams written by hand -------------------------------------------
CASES = {
    "single": [H("<image>\nWhat colour is the shape?"), G("Red")],
    "multi": [H("<image>\nWhat colour is the shape?"), G("Red"), H("How many shapes are there?"), G("Two")],
    "text_only": [H("What is a circle?"), G("A shape")],
    "image_middle": [H("What <image> colour is it?"), G("Red")],
    "image_end": [H("What colour is the shape? <image>"), G("Red")],
    "image_second_turn": [H("Hi"), G("Yes"), H("<image>\nWhat colour?"), G("Blue")],
    "unicode_spaces": [H("<image>\nIs it  café   red?"), G("Yes  it is é")],
}
# Pieces every stream of a template shares (system="" in CASES, to keep them short; DEFAULT_SYSTEM
# below covers each template's own system text).
V_IMG = "▁USER: ▁ <image> <image> ▁ <0x0A> What"  # vicuna: lone ▁ before the image, ▁ opening the next chunk
L2_IMG = "▁[INST] ▁ <image> <image> ▁ <0x0A> What"
L3U = "<|start_header_id|> user <|end_header_id|> Ċ Ċ"
L3A = "<|start_header_id|> assistant <|end_header_id|> Ċ Ċ"
DATES = ("<|start_header_id|> system <|end_header_id|> Ċ Ċ C u t t ing ĠK n ow led ge ĠD at e : ĠD e ce m b er Ġ "
         "2 0 2 3 Ċ T o d a y ĠD at e : Ġ 2 6 ĠJ u l Ġ 2 0 2 4 Ċ Ċ")  # Meta's 3.1 system header
L31 = f"<|begin_of_text|> {DATES} <|eot_id|>"
L3 = "<|begin_of_text|>"
EXPECTED = {
    ("vicuna_v1", "single"): f"<s> {V_IMG} ▁colour ▁is ▁the ▁shape? ▁ASSISTANT: +▁Red +</s>",
    ("vicuna_v1", "multi"): f"<s> {V_IMG} ▁colour ▁is ▁the ▁shape? ▁ASSISTANT: +▁Red +</s> "
                            "USER: ▁How ▁many ▁shapes ▁are ▁there? ▁ASSISTANT: +▁Two +</s>",
    ("vicuna_v1", "text_only"): "<s> ▁USER: ▁What ▁is ▁a ▁circle? ▁ASSISTANT: +▁A +▁shape +</s>",
    # LLaVA's replace leaves two spaces where the image was: "What  colour"
    ("vicuna_v1", "image_middle"): f"<s> {V_IMG} ▁ ▁colour ▁is ▁it? ▁ASSISTANT: +▁Red +</s>",
    ("vicuna_v1", "image_end"): f"<s> {V_IMG} ▁colour ▁is ▁the ▁shape? ▁ASSISTANT: +▁Red +</s>",
    ("vicuna_v1", "image_second_turn"): "<s> ▁USER: ▁H i ▁ASSISTANT: +▁Yes +</s> "
                                        "USER: ▁ <image> <image> ▁ <0x0A> What ▁colour ? ▁ASSISTANT: +▁Blue +</s>",
    ("vicuna_v1", "unicode_spaces"): "<s> ▁USER: ▁ <image> <image> ▁ <0x0A> Is ▁it ▁ ▁c a f <0xC3> <0xA9> ▁ ▁ ▁red ? "
                                     "▁ASSISTANT: +▁Yes +▁ +▁it +▁is +▁ +<0xC3> +<0xA9> +</s>",
    ("llama_2", "single"): f"<s> {L2_IMG} ▁colour ▁is ▁the ▁shape? ▁[/INST] +▁Red +▁ +</s>",
    ("llama_2", "multi"): f"<s> {L2_IMG} ▁colour ▁is ▁the ▁shape? ▁[/INST] +▁Red +▁ +</s> "
                          "<s> [INST] ▁How ▁many ▁shapes ▁are ▁there? ▁[/INST] +▁Two +▁ +</s>",
    ("llama_2", "text_only"): "<s> ▁[INST] ▁What ▁is ▁a ▁circle? ▁[/INST] +▁A +▁shape +▁ +</s>",
    ("llama_2", "image_middle"): f"<s> {L2_IMG} ▁ ▁colour ▁is ▁it? ▁[/INST] +▁Red +▁ +</s>",
    ("llama_2", "image_end"): f"<s> {L2_IMG} ▁colour ▁is ▁the ▁shape? ▁[/INST] +▁Red +▁ +</s>",
    ("llama_2", "image_second_turn"): "<s> ▁[INST] ▁H i ▁[/INST] +▁Yes +▁ +</s> "
                                      "<s> [INST] ▁ <image> <image> ▁ <0x0A> What ▁colour ? ▁[/INST] +▁Blue +▁ +</s>",
    ("llama_2", "unicode_spaces"): "<s> ▁[INST] ▁ <image> <image> ▁ <0x0A> Is ▁it ▁ ▁c a f <0xC3> <0xA9> ▁ ▁ ▁red ? "
                                   "▁[/INST] +▁Yes +▁ +▁it +▁is +▁ +<0xC3> +<0xA9> +▁ +</s>",
    ("llama_3", "single"): f"{L3} {L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> "
                           f"{L3A} +Red +<|eot_id|>",
    ("llama_3", "multi"): f"{L3} {L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> "
                          f"{L3A} +Red +<|eot_id|> {L3U} How Ġmany Ġshapes Ġare Ġthere ? <|eot_id|> "
                          f"{L3A} +Two +<|eot_id|>",
    ("llama_3", "text_only"): f"{L3} {L3U} What Ġis Ġa Ġcircle ? <|eot_id|> {L3A} +A +Ġshape +<|eot_id|>",
    ("llama_3", "image_middle"): f"{L3} {L3U} <image> <image> Ċ What Ġ Ġcolour Ġis Ġit ? <|eot_id|> "
                                 f"{L3A} +Red +<|eot_id|>",
    ("llama_3", "image_end"): f"{L3} {L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> "
                              f"{L3A} +Red +<|eot_id|>",
    ("llama_3", "image_second_turn"): f"{L3} {L3U} H i <|eot_id|> {L3A} +Yes +<|eot_id|> "
                                      f"{L3U} <image> <image> Ċ What Ġcolour ? <|eot_id|> {L3A} +Blue +<|eot_id|>",
    ("llama_3", "unicode_spaces"): f"{L3} {L3U} <image> <image> Ċ Is Ġit Ġ Ġc a f Ã © Ġ Ġ Ġred ? <|eot_id|> "
                                   f"{L3A} +Yes +Ġ +Ġit +Ġis +Ġ +Ã +© +<|eot_id|>",
    ("llama_3_1", "single"): f"{L31} {L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> "
                             f"{L3A} +Red +<|eot_id|>",
    ("llama_3_1", "multi"): f"{L31} {L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> "
                            f"{L3A} +Red +<|eot_id|> {L3U} How Ġmany Ġshapes Ġare Ġthere ? <|eot_id|> "
                            f"{L3A} +Two +<|eot_id|>",
    ("llama_3_1", "text_only"): f"{L31} {L3U} What Ġis Ġa Ġcircle ? <|eot_id|> {L3A} +A +Ġshape +<|eot_id|>",
    ("llama_3_1", "image_middle"): f"{L31} {L3U} <image> <image> Ċ What Ġ Ġcolour Ġis Ġit ? <|eot_id|> "
                                   f"{L3A} +Red +<|eot_id|>",
    ("llama_3_1", "image_end"): f"{L31} {L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> "
                                f"{L3A} +Red +<|eot_id|>",
    ("llama_3_1", "image_second_turn"): f"{L31} {L3U} H i <|eot_id|> {L3A} +Yes +<|eot_id|> "
                                        f"{L3U} <image> <image> Ċ What Ġcolour ? <|eot_id|> {L3A} +Blue +<|eot_id|>",
    ("llama_3_1", "unicode_spaces"): f"{L31} {L3U} <image> <image> Ċ Is Ġit Ġ Ġc a f Ã © Ġ Ġ Ġred ? <|eot_id|> "
                                     f"{L3A} +Yes +Ġ +Ġit +Ġis +Ġ +Ã +© +<|eot_id|>",
}


@pytest.mark.parametrize("template,case", list(EXPECTED))
def test_token_stream(template, case):
    tok = _tok(BACKBONE[template])
    ids, labels = encode_conversation(tok, template, CASES[case], image_token_id=_img(tok), num_image_tokens=2,
                                      system="", image_at_turn_start=True)
    assert stream(tok, ids, labels) == EXPECTED[template, case]


VICUNA_SYS = ("▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant. ▁The ▁assistant "
              "▁gives ▁helpful, ▁detailed, ▁and ▁polite ▁answers ▁to ▁the ▁user's ▁questions.")
LLAVA_SYS_BL = ("You Ġare Ġa Ġhelpful Ġlanguage Ġand Ġvision Ġassistant . ĠYou Ġare Ġable Ġto Ġunderstand Ġthe "
                "Ġvisual Ġcontent Ġthat Ġthe Ġuser Ġprovides , Ġand Ġassist Ġthe Ġuser Ġwith Ġa Ġvariety Ġof Ġtasks "
                "Ġusing Ġnatural Ġlanguage .")  # LLaVA's llama_2/llama_3 system text, byte-level pieces
LLAVA_SYS_SP_HEAD = ("▁<<SYS>> <0x0A> You ▁are ▁a ▁helpful ▁language ▁and ▁vision ▁assistant. ▁You ▁are ▁able ▁to "
                     "▁understand ▁the ▁visual ▁content ▁that ▁the ▁user ▁provides, ▁and ▁assist ▁the ▁user ▁with "
                     "▁a ▁variety ▁of ▁tasks ▁using ▁natural ▁language. <0x0A> <</SYS>> <0x0A>")
LLAVA_SYS_SP = LLAVA_SYS_SP_HEAD + " <0x0A>"  # the block's last newline on its own, when an image follows
DEFAULT_SYSTEM = {  # CASES["multi"] with the image after the question, and the template's own system text
    "vicuna_v1": f"<s> {VICUNA_SYS} {V_IMG} ▁colour ▁is ▁the ▁shape? ▁ASSISTANT: +▁Red +</s> "
                 "USER: ▁How ▁many ▁shapes ▁are ▁there? ▁ASSISTANT: +▁Two +</s>",
    # the system block ends in "\n\n": that chunk has no trailing space, so no lone ▁ before the image
    "llama_2": f"<s> ▁[INST] {LLAVA_SYS_SP} <image> <image> ▁ <0x0A> What ▁colour ▁is ▁the ▁shape? ▁[/INST] +▁Red +▁ "
               "+</s> <s> [INST] ▁How ▁many ▁shapes ▁are ▁there? ▁[/INST] +▁Two +▁ +</s>",
    "llama_3": f"{L3} <|start_header_id|> system <|end_header_id|> Ċ Ċ {LLAVA_SYS_BL} <|eot_id|> "
               f"{L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> {L3A} +Red +<|eot_id|> "
               f"{L3U} How Ġmany Ġshapes Ġare Ġthere ? <|eot_id|> {L3A} +Two +<|eot_id|>",
    "llama_3_1": f"{L3} {DATES} {LLAVA_SYS_BL} <|eot_id|> "
                 f"{L3U} <image> <image> Ċ What Ġcolour Ġis Ġthe Ġshape ? <|eot_id|> {L3A} +Red +<|eot_id|> "
                 f"{L3U} How Ġmany Ġshapes Ġare Ġthere ? <|eot_id|> {L3A} +Two +<|eot_id|>",
}


@pytest.mark.parametrize("template", TEMPLATES)
def test_token_stream_with_the_default_system(template):
    tok = _tok(BACKBONE[template])
    conv = [H("What colour is the shape?\n<image>"), G("Red"), H("How many shapes are there?"), G("Two")]
    ids, labels = encode_conversation(tok, template, conv, image_token_id=_img(tok), num_image_tokens=2,
                                      image_at_turn_start=True)
    assert stream(tok, ids, labels) == DEFAULT_SYSTEM[template]
    assert ids.count(tok.bos_token_id) == (2 if template == "llama_2" else 1)  # llama_2: LLaVA's "<s>" per round


@pytest.mark.parametrize("template,expected", [
    ("vicuna_v1", "<s> ▁USER: ▁What ▁ <image> <image> ▁colour ▁is ▁it? ▁ASSISTANT: +▁Red +</s>"),
    ("llama_3", f"{L3} {L3U} What Ġ <image> <image> Ġcolour Ġis Ġit ? <|eot_id|> {L3A} +Red +<|eot_id|>"),
])
def test_image_kept_in_place_when_switched_off(template, expected):
    tok = _tok(BACKBONE[template])
    ids, labels = encode_conversation(tok, template, CASES["image_middle"], image_token_id=_img(tok),
                                      num_image_tokens=2, system="")
    assert stream(tok, ids, labels) == expected


@pytest.mark.parametrize("backbone,expected", [
    # conv_llava_plain: "<image>" + caption + "\n"; the caption chunk starts with ▁ (item 8: "▁A", not "A")
    ("vicuna-tiny", "<s> <image> <image> +▁A +▁red +▁circle +. +<0x0A>"),
    ("llama3-tiny", "<|begin_of_text|> <image> <image> +A +Ġred +Ġcircle +.Ċ"),
])
def test_stage1_plain_stream(backbone, expected):
    tok = _tok(backbone)
    ids, labels = encode_conversation(tok, "plain", [H("Describe the image.\n<image>"), G("A red circle.")],
                                      image_token_id=_img(tok), num_image_tokens=2, image_at_turn_start=True)
    assert stream(tok, ids, labels) == expected


def test_move_images_to_turn_start():
    assert move_images_to_turn_start("What is this? <image>") == "<image>\nWhat is this?"
    assert move_images_to_turn_start("  <image>\n  Hi ") == "<image>\nHi"
    assert move_images_to_turn_start("<image>") == "<image>"
    assert move_images_to_turn_start("no image") == "no image"
    assert move_images_to_turn_start("<image> a <image> b") == "<image>\n<image>\na  b"


@pytest.mark.parametrize("template", [*TEMPLATES, "plain"])
def test_empty_answer_is_a_skipped_sample(template):
    tok = _tok(BACKBONE[template])
    for empty in ("", "  \n"):
        with pytest.raises(SampleError, match="turn 1: empty answer"):
            encode_conversation(tok, template, [H("<image>\nWhat colour?"), G(empty)], image_token_id=_img(tok),
                                num_image_tokens=2)
    with pytest.raises(SampleError, match="turn 3: empty answer"):
        encode_conversation(tok, "vicuna_v1", [H("<image>\nHi"), G("Red"), H("And?"), G("")],
                            image_token_id=_img(tok), num_image_tokens=2)


# -- special-token text in the data is text -------------------------------------------------------
SPECIAL_TEXT = "</s> <s> <|eot_id|> <|start_header_id|> <|begin_of_text|> <image"


@pytest.mark.parametrize("template", [*TEMPLATES, "plain"])
def test_special_token_text_in_data_is_plain_text(template):
    tok = _tok(BACKBONE[template])
    kw = dict(image_token_id=_img(tok), num_image_tokens=2, image_at_turn_start=True)
    clean = [H("<image>\nWhat is x?"), G("It is x.")]
    dirty = [H(f"<image>\nWhat is {SPECIAL_TEXT}?"), G(f"It is {SPECIAL_TEXT}.")]
    ids_clean, _ = encode_conversation(tok, template, clean, **kw)
    ids_dirty, labels = encode_conversation(tok, template, dirty, **kw)
    named = ["</s>", "<s>", "<|eot_id|>", "<|start_header_id|>", "<|begin_of_text|>", "<|end_header_id|>"]
    special = {tok.convert_tokens_to_ids(t) for t in named} | set(tok.all_special_ids)
    special -= {_img(tok), tok.unk_token_id}
    assert len(special & set(tok.convert_tokens_to_ids(named))) >= 2  # the vocabulary has them as tokens
    count = lambda ids: sorted(i for i in ids if i in special)  # noqa: E731
    assert count(ids_dirty) == count(ids_clean), "special-token text in the data became special tokens"
    # and the text round-trips: the answer's labelled tokens decode to the text, the end token aside
    answer = tok.decode([t for t, lab in zip(ids_dirty, labels) if lab != -100 and t not in special])
    assert SPECIAL_TEXT in answer


# -- 2,048 tokens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("template,prefix", [
    ("vicuna_v1", f"<s> {VICUNA_SYS} ▁USER: ▁What ▁colour ? ▁ASSISTANT:"),
    # no image: the system block's two newlines, then the question (newlines are <0x0A>, never merged)
    ("llama_2", f"<s> ▁[INST] {LLAVA_SYS_SP_HEAD} <0x0A> What ▁colour ? ▁[/INST]"),
    ("llama_3", f"{L3} <|start_header_id|> system <|end_header_id|> Ċ Ċ {LLAVA_SYS_BL} <|eot_id|> "
                f"{L3U} What Ġcolour ? <|eot_id|> {L3A}"),
    ("llama_3_1", f"{L3} {DATES} {LLAVA_SYS_BL} <|eot_id|> {L3U} What Ġcolour ? <|eot_id|> {L3A}"),
])
def test_over_2048_tokens_is_truncated_as_llava(template, prefix, tmp_path):
    """LLaVA cuts ids and labels at model_max_length = 2048 (collator) and the expanded sequence at
    tokenizer_model_max_length (llava_arch.py): the sample is kept, its first 2048 tokens trained."""
    tok = _tok(BACKBONE[template])
    answer = " ".join(["red"] * 3000)
    sentencepiece = template in ("vicuna_v1", "llama_2")
    first = "+▁red" if sentencepiece else "+red"
    rest = "+▁red" if sentencepiece else "+Ġred"
    n_prefix = len(prefix.split())
    expected = " ".join([prefix, first] + [rest] * (2048 - n_prefix - 1))
    samples = [Sample("long", [], [H("What colour?"), G(answer)]), Sample("short", [], [H("What colour?"), G("red")])]
    kw = dict(tokenizer=tok, template=template, image_token_id=_img(tok), num_image_tokens=2,
              image_spec=vision.from_name("clip-l-336-tiny").image_spec(), image_root=tmp_path,
              max_length=2048, show_progress=False, max_skip_fraction=1.0)
    kept = StageDataset(samples, overlong="truncate", **kw)
    assert [e.id for e in kept.items] == ["long", "short"] and kept.lengths[0] == 2048
    e = kept.items[0]
    assert stream(tok, e.input_ids.tolist(), e.labels.tolist()) == expected  # no end token: cut mid-answer
    skipped = StageDataset(samples, overlong="skip", **kw)
    assert [e.id for e in skipped.items] == ["short"]
    assert "longer than the context limit of 2048" in skipped.skipped[0][1]


def test_truncation_never_cuts_an_image_or_leaves_no_target():
    img = 7
    ids, labels = [1, 5, img, img, 6, 9, 9], [-100, -100, -100, -100, -100, 9, 9]
    assert truncate(ids, labels, 6, img) == ([1, 5, img, img, 6, 9], [-100, -100, -100, -100, -100, 9])
    with pytest.raises(SampleError, match="cut an image"):
        truncate(ids, labels, 3, img)
    with pytest.raises(SampleError, match="no target token within the first"):
        truncate(ids, labels, 5, img)
    # a cut right after an image's last slot keeps it whole
    ids2, labels2 = [1, 9, img, img, 6, 9], [-100, 9, -100, -100, -100, 9]
    assert truncate(ids2, labels2, 4, img) == ([1, 9, img, img], [-100, 9, -100, -100])


# -- LLaVA's own preprocessing as an oracle (ids), on synthetic LLaVA-665k-like conversations -----
def _llava_prompt(template: str, conv: list[dict]) -> str:
    """LLaVA's conversation.py get_prompt (conv_vicuna_v1, conv_llava_llama_2) and Meta's 3.1 chat
    template as LLaVA-MORE renders it, after preprocess_multimodal; the BOS comes from the tokenizer."""
    msgs = [("user" if t["from"] == "human" else "assistant", move_images_to_turn_start(t["value"])) for t in conv]
    if template == "vicuna_v1":
        system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")
        ret, seps = system + " ", [" ", "</s>"]
        for i, (role, m) in enumerate(msgs):
            ret += ("USER" if role == "user" else "ASSISTANT") + ": " + m + seps[i % 2]
        return ret
    system = ("You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.")
    if template == "llama_2":
        ret = ""
        for i, (_, m) in enumerate(msgs):
            if i == 0:
                m = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + m
            ret += f"<s>[INST] {m} [/INST]" if i % 2 == 0 else f" {m} </s>"
        return ret.removeprefix("<s>")
    ret = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
           f"Today Date: 26 Jul 2024\n\n{system}<|eot_id|>")
    for role, m in msgs:
        ret += f"<|start_header_id|>{role}<|end_header_id|>\n\n{m.strip()}<|eot_id|>"
    return ret


def _tokenizer_image_token(tok, prompt: str, img_id: int | None = None) -> list[int]:
    """llava/mm_utils.py tokenizer_image_token: each chunk ``tok(chunk)``, its BOS dropped after the first."""
    img_id = _img(tok) if img_id is None else img_id
    chunks = [tok(c).input_ids for c in prompt.split(IMAGE_PLACEHOLDER)]
    out = [chunks[0][0]]
    for i, c in enumerate(chunks):
        out += ([img_id] if i else []) + c[1:]
    return out


@pytest.fixture(scope="module")
def synthetic_conversations(tmp_path_factory):
    from barnfast.data.llava import load_llava_json
    from barnfast.data.synthetic import generate

    root = tmp_path_factory.mktemp("syn")
    generate(root, num_stage1=1, num_stage2=300, num_eval=1, image_size=32, seed=0, progress=False)
    convs = [s.conversations for s in load_llava_json(root / "stage2.json")]
    # LLaVA-665k-like extras: long, multi-turn, runs of spaces, unicode, the image at the end
    convs += [[H("<image>\nDescribe  it   in  detail. " * 3), G("A  red   circle,  café. " * 20)],
              [H("What is left? <image>"), G("Red"), H("And   right?"), G("Blue  square"), H("Count?"), G("2")],
              [H("Tell me about naïve\tart."), G("It  is   art.")]]
    return convs


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "llama_3_1"])
def test_ids_match_llava_preprocessing(template, synthetic_conversations):
    tok = _tok(BACKBONE[template])
    n_img = 0
    for conv in synthetic_conversations:
        ids, _ = encode_conversation(tok, template, conv, image_token_id=_img(tok), num_image_tokens=1,
                                     image_at_turn_start=True)
        ref = _tokenizer_image_token(tok, _llava_prompt(template, conv))
        assert ids == ref, (conv, tok.convert_ids_to_tokens(ids), tok.convert_ids_to_tokens(ref))
        n_img += _img(tok) in ids
    assert n_img > 250  # most samples have an image (the synthetic set has ~5% text-only)


# -- image preprocessing per stage ----------------------------------------------------------------
def _expand2square(img: Image.Image, colour) -> Image.Image:
    """llava/train/train.py expand2square, as written there."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), colour)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def test_image_preprocessing_per_stage_on_non_square_photos(tmp_path):
    """llava15: stage 1 the CLIP processor as is (pretrain.sh has no image_aspect_ratio), stage 2
    expand2square with the mean colour first (finetune.sh: pad); each stage's vision-cache key differs."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from barnfast.training import distributed
    from barnfast.training.trainer import Trainer

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    records = []
    for i, (w, h) in enumerate([(97, 41), (30, 88), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"img/{i}.png",
                        "conversations": [H("<image>\nWhat is it?"), G("A photo.")]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = load_recipe("llava15", {"model.backbone": "llama1-tiny", "data.stage1_data": str(tmp_path / "data.json"),
                                     "data.stage2_data": str(tmp_path / "data.json"), "data.num_workers": 0,
                                     "data.vision_cache": str(tmp_path / "vc"), "output_dir": str(tmp_path / "run")})
    assert [s.image_aspect for s in recipe.stages] == ["resize", "pad"]
    trainer = Trainer(recipe, distributed.init_distributed(), show_progress=False)
    try:
        s1, s2 = (trainer.build_dataset(s) for s in recipe.stages)
    finally:
        trainer.close()
    tower = trainer.vision
    proc = CLIPImageProcessorPil(size={"shortest_edge": tower.image_size}, crop_size={
        "height": tower.image_size, "width": tower.image_size}, image_mean=list(tower.mean), image_std=list(tower.std))
    colour = tuple(int(x * 255) for x in proc.image_mean)
    for i in range(3):
        img = Image.open(tmp_path / "img" / f"{i}.png").convert("RGB")
        want1 = torch.as_tensor(np.asarray(proc(img)["pixel_values"][0]))
        want2 = torch.as_tensor(np.asarray(proc(_expand2square(img, colour))["pixel_values"][0]))
        got1, got2 = s1.load_pixels(tmp_path / "img" / f"{i}.png"), s2.load_pixels(tmp_path / "img" / f"{i}.png")
        assert (got1 - want1).abs().max() <= 5e-7 and (got2 - want2).abs().max() <= 5e-7
        if i < 2:  # non-square: the two stages see different pixels
            assert (got1 - got2).abs().max() > 0.5
    assert (s1.cache.settings.image_aspect, s2.cache.settings.image_aspect) == ("resize", "pad")
    assert s1.cache.dir != s2.cache.dir


@pytest.mark.parametrize("recipe_name, overrides, system", [
    ("llava15", {}, "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions."),
    ("llava15-tiny", {}, ""),
    ("llava15-tiny", {"train.system_prompt": "Be brief."}, "Be brief."),
])
def test_trainer_encodes_the_recipes_system_text(tmp_path, recipe_name, overrides, system):
    """Stage 2 samples carry the recipe's system text: LLaVA's vicuna_v1 text for llava15, none for the
    tiny recipe (train.system_prompt = ""), and an override's own."""
    from barnfast.training import distributed
    from barnfast.training.trainer import Trainer

    (tmp_path / "data.json").write_text(json.dumps([{"id": "t0", "conversations": [H("What is it?"), G("A cat.")]}]))
    recipe = load_recipe(recipe_name, {"model.backbone": "llama1-tiny", "data.stage2_data": str(tmp_path / "data.json"),
                                       "data.stage1_data": str(tmp_path / "data.json"), "data.num_workers": 0,
                                       "output_dir": str(tmp_path / "run"), **overrides})
    trainer = Trainer(recipe, distributed.init_distributed(), show_progress=False)
    try:
        data = trainer.build_dataset(recipe.stages[1])
    finally:
        trainer.close()
    text = trainer.tokenizer.decode(data.items[0].input_ids.tolist(), skip_special_tokens=True)
    assert text.startswith(f"{system} USER: What is it? ASSISTANT:" if system else "USER: What is it? ASSISTANT:"), text


# -- the LR schedule against transformers --------------------------------------------------------
@pytest.mark.parametrize("total", [5198, 2181, 10, 1])  # LLaVA-1.5 stage 2 (665,298 / 128), stage 1 (558,128 / 256)
def test_lr_matches_transformers_cosine_with_warmup(total, tmp_path):
    from transformers import TrainingArguments, get_cosine_schedule_with_warmup

    base = 2e-5
    warmup = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.03).get_warmup_steps(total)
    assert warmup == math.ceil(total * 0.03)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    theirs = []
    for _ in range(total):  # HF Trainer: the step runs at get_last_lr(), then scheduler.step()
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    for step in sorted({0, 1, warmup, total - 1} & set(range(total))):
        assert lr_at(step, total, base, 0.03) == pytest.approx(theirs[step], rel=1e-12, abs=1e-18), step
    assert lr_at(0, total, base, 0.03) == 0.0


# -- item 8: LLaVA's slow SentencePiece tokenizer vs transformers 5's fast one -------------------
class SlowLlamaTokenizer:
    """What LLaVA gets from ``AutoTokenizer.from_pretrained(..., use_fast=False)`` under its pinned
    transformers 4.37: the slow ``LlamaTokenizer`` on a ``tokenizer.model``, re-written on the
    sentencepiece library (transformers 5 has no slow LLaMA tokenizer). ``legacy=False``: the model's
    dummy prefix is switched off and ``▁`` is put once before the whole text, so a piece after a special
    token gets none; ``legacy=True``: every piece between special tokens is encoded with the prefix."""

    SPECIALS = ("<unk>", "<s>", "</s>")

    def __init__(self, model_proto: bytes, legacy: bool):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_proto)
        if not legacy:
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.unk_len = len(self.sp.encode("<unk>", out_type=str))

    def _tokenize(self, text: str) -> list[str]:
        if self.legacy or not text.startswith(("▁", " ")):
            return self.sp.encode(text, out_type=str)
        return self.sp.encode("<unk>" + text, out_type=str)[self.unk_len:]  # keeps the leading ▁

    def __call__(self, text: str):
        import re
        from types import SimpleNamespace

        if not self.legacy and text:
            text = "▁" + text.replace("▁", " ")
        pieces = []
        for part in re.split("(<unk>|<s>|</s>)", text):
            pieces += [part] if part in self.SPECIALS else (self._tokenize(part) if part else [])
        if not self.legacy and len(pieces) > 1 and pieces[0] == "▁" and pieces[1] in self.SPECIALS:
            pieces = pieces[1:]
        return SimpleNamespace(input_ids=[1] + [self.sp.piece_to_id(p) for p in pieces])


@pytest.fixture(scope="module")
def sentencepiece_checkpoints(tmp_path_factory, synthetic_conversations):
    """A LLaMA-style ``tokenizer.model`` trained here (BPE, byte fallback, digits split, whitespace
    kept, dummy prefix) and three checkpoint folders: ``legacy`` true, false, and no key at all."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2

    from barnfast.models.tokenizers_tiny import CORPUS

    root = tmp_path_factory.mktemp("spm")
    lines = list(CORPUS) * 20 + [t["value"].replace("<image>", "").replace("\n", " ")
                                 for c in synthetic_conversations for t in c]
    lines += ["in  with   spaces    and tabs\tand café naïve 東京", "def f():    return  1        x  =  2"] * 200
    (root / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tok"), vocab_size=1200, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((root / "tok.model").read_bytes())
    # Whitespace-only pieces last, so that SentencePiece prefers "▁with" to "▁▁" as LLaMA's model does
    # (the example, on the real checkpoint: slow "▁in ▁ ▁with", fast "▁in ▁▁ with").
    for piece in proto.pieces:
        if len(piece.piece) > 1 and set(piece.piece) == {"▁"}:
            piece.score = -1e9
    model = proto.SerializeToString()
    dirs = {}
    for legacy in ("true", "false", "missing"):
        d = root / legacy
        d.mkdir()
        (d / "tokenizer.model").write_bytes(model)
        cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        if legacy != "missing":
            cfg["legacy"] = legacy == "true"
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        dirs[legacy] = d
    return model, dirs


def _llava_v1_labels(slow, prompt: str, img: int) -> list[int] | None:
    """llava/train/train.py preprocess_v1's masking (legacy=False, tokenizers >= 0.14); None where it
    reports a "tokenization mismatch" (and zeroes the sample)."""
    target = _tokenizer_image_token(slow, prompt, img_id=img)
    total, sep, cur = len(target), " ASSISTANT: ", 1
    target[:1] = [-100]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_tokenizer_image_token(slow, rou, img_id=img))
        instruction_len = len(_tokenizer_image_token(slow, parts[0] + sep, img_id=img)) - 2
        if i != 0:  # "not tokenizer.legacy": "USER" after "</s>" has no ▁
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur:cur + instruction_len] = [-100] * len(target[cur:cur + instruction_len])
        cur += round_len
    target[cur:] = [-100] * len(target[cur:])
    return None if cur != total else target


def _space_variants(convs, kind: str, seed: int = 0):
    """Copies of ``convs`` with one edit each, at a random word of a random turn."""
    import copy
    import random

    rng = random.Random(seed)
    out = []
    for conv in convs:
        conv = copy.deepcopy(conv)
        turn = conv[rng.randrange(len(conv))] if kind != "leading_space_answer" else conv[1]
        words = turn["value"].split(" ")
        k = rng.randrange(max(1, len(words) - 1))
        extra = {"double_space": " ", "triple_space": "  ", "newline_space": "\n ", "tab": "\t",
                 "unicode": " café naïve 東京 😀", "leading_space_answer": None}[kind]
        if extra is None:
            turn["value"] = " " + turn["value"]
        else:
            words[k] += extra
            turn["value"] = " ".join(words)
        out.append(conv)
    return out


def test_slow_sentencepiece_vs_transformers5_fast(sentencepiece_checkpoints, synthetic_conversations):
    """Item 8, measured on the LLaVA-665k-like sample (300 synthetic stage-2 conversations, each also with
    one edit: a space run, a tab, unicode, ...; and 3 crafted long / multi-turn / space-run ones).
    LLaVA's ids: its prompt, tokenized chunk by chunk with the slow tokenizer; barnfast's:
    encode_conversation on transformers 5's fast tokenizer of the same tokenizer.model. The README
    quotes these numbers."""
    from transformers import AutoTokenizer

    model, dirs = sentencepiece_checkpoints
    convs = synthetic_conversations[:-3]  # the synthetic set: no runs of spaces

    def compare(checkpoint: str, slow_legacy: bool, samples) -> tuple[int, list]:
        fast = AutoTokenizer.from_pretrained(dirs[checkpoint])
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
        slow, img = SlowLlamaTokenizer(model, slow_legacy), _img(fast)
        diffs = []
        for conv in samples:
            ids, _ = encode_conversation(fast, "vicuna_v1", conv, image_token_id=img, num_image_tokens=1,
                                         image_at_turn_start=True)
            ref = _tokenizer_image_token(slow, _llava_prompt("vicuna_v1", conv), img_id=img)
            if ids != ref:
                diffs.append((fast.convert_ids_to_tokens(ids), [slow.sp.id_to_piece(i) if i != img else "<image>"
                                                                for i in ref]))
        return len(diffs), diffs

    # Labels too, where LLaVA's own masking (preprocess_v1) reports no tokenization mismatch.
    fast = AutoTokenizer.from_pretrained(dirs["false"])
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    slow, img = SlowLlamaTokenizer(model, legacy=False), _img(fast)
    mismatched = 0
    for conv in convs:
        ids, labels = encode_conversation(fast, "vicuna_v1", conv, image_token_id=img, num_image_tokens=1,
                                          image_at_turn_start=True)
        ref = _llava_v1_labels(slow, _llava_prompt("vicuna_v1", conv), img)
        if ref is None:
            mismatched += 1
        else:
            assert labels == ref, conv
    # LLaVA's "-1 after </s>" assumes "USER" is one token shorter than "▁USER"; in this vocabulary it is one
    # longer ("US ER" vs "▁USER"), so LLaVA zeroes every multi-turn sample (its bug, see the README);
    # on all the others its labels and barnfast's are the same.
    assert mismatched == sum(len(c) > 2 for c in convs) and mismatched < len(convs)

    # The checkpoint's legacy setting honoured, no space runs, unicode, tabs: token for token.
    n_multi = sum(len(c) > 2 for c in convs)
    for checkpoint, slow_legacy in (("false", False), ("true", True)):
        assert compare(checkpoint, slow_legacy, convs)[0] == 0
        for kind in ("unicode", "tab"):
            assert compare(checkpoint, slow_legacy, _space_variants(convs, kind))[0] == 0, kind
    # No legacy key: transformers 4.37 reads it as legacy=True (with a warning), transformers 5 as
    # legacy=False, so every multi-turn sample differs after each "</s>" ("▁USER" vs "USER").
    n, diffs = compare("missing", True, convs)
    assert n == n_multi and all("</s>" in a for a, _ in diffs)
    # Runs of spaces: the fast BPE merges "▁▁" first, SentencePiece splits before the word.
    measured = {}
    for kind in ("crafted", "double_space", "triple_space", "newline_space", "leading_space_answer"):
        samples = synthetic_conversations[-3:] if kind == "crafted" else _space_variants(convs, kind)
        n, diffs = compare("false", False, samples)
        measured[kind] = n
        for fast_toks, slow_toks in diffs:
            j = next(i for i, (a, b) in enumerate(zip(fast_toks, slow_toks)) if a != b)
            assert set(fast_toks[j]) == {"▁"} and set(slow_toks[j]) == {"▁"} and len(fast_toks[j]) > len(
                slow_toks[j]), (kind, fast_toks[j - 3:j + 3], slow_toks[j - 3:j + 3])
    print(f"\nitem 8 on {len(convs)} conversations ({n_multi} multi-turn): legacy key missing -> {n_multi} differ; "
          + ", ".join(f"{k}: {v}" for k, v in measured.items()))
    assert measured["double_space"] > 0 and measured["leading_space_answer"] > 0


def test_every_llava15_field_names_its_origin():
    """Each field of recipes/llava15.toml has a comment: the original value's file, or why barnfast differs."""
    import re
    import tomllib

    from barnfast.config import RECIPES_DIR

    text = (RECIPES_DIR / "llava15.toml").read_text()
    sources = ("pretrain.sh", "finetune.sh", "train.py", "builder.py", "barnfast only", "departs")
    fields = [line for line in text.splitlines() if re.match(r"^[a-z_0-9]+\s*=", line)]
    assert len(fields) >= 30
    for line in fields:
        assert "#" in line and any(s in line.split("#", 1)[1] for s in sources), line
    doc = tomllib.loads(text)
    assert doc["data"]["max_length"] == 2048 and doc["data"]["overlong"] == "truncate"
    assert [(s["image_aspect"], s["group_by_modality"]) for s in doc["stages"]] == [("resize", False), ("pad", True)]
