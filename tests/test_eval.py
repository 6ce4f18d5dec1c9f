"""barnfast.evaluation (evaluate, generate) and the lmms-eval adapter on a tiny trained export; file formats."""

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from barnfast.config import load_recipe
from barnfast.evaluation import EvalItem, ExportedVLM, load_items
from barnfast.evaluation import evaluate as eval_lib
from barnfast.evaluation import generate as generate_lib
from barnfast.evaluation.lmms_eval_adapter import BarnfastLMM
from tests.test_sweep import BACKBONES, finished_sweep


@functools.cache
def _vlm() -> ExportedVLM:
    out, _ = finished_sweep()
    return ExportedVLM(out / BACKBONES[0] / "export", device="cpu")


def _data() -> Path:
    return finished_sweep()[0] / "data"


# -- formats (no model) ---------------------------------------------------------------------------------


def test_pope_scienceqa_llava_formats(tmp_path):
    pope = tmp_path / "coco_pope_adversarial.json"
    pope.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}\n'
                    '{"question_id": 2, "image": "b.jpg", "text": "Is there a cat in the image?", "label": "no"}\n')
    items = load_items(pope, image_root=tmp_path / "coco")
    assert [(i.task, i.answer, i.category) for i in items] == [("yesno", "yes", "adversarial"),
                                                               ("yesno", "no", "adversarial")]
    assert items[0].image == tmp_path / "coco" / "a.jpg"
    assert items[0].prompt.startswith("Is there a dog in the image?\n")

    problems = {"10": {"question": "Which is a mammal?", "choices": ["frog", "whale", "trout"], "answer": 1,
                       "hint": "Look closely.", "image": "image.png", "split": "test", "subject": "natural science"},
                "11": {"question": "No image here", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
                       "split": "test", "subject": "language science"},
                "12": {"question": "Train item", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
                       "split": "train", "subject": "social science"}}
    sqa = tmp_path / "problems.json"
    sqa.write_text(json.dumps(problems))
    items = load_items(sqa, image_root=tmp_path / "images")
    assert len(items) == 1 and items[0].answer == "B" and items[0].options == {"A": "frog", "B": "whale", "C": "trout"}
    assert items[0].image == tmp_path / "images" / "test" / "10" / "image.png"
    assert items[0].prompt == ("Context: Look closely.\nWhich is a mammal?\nA. frog\nB. whale\nC. trout\n"
                               "Answer with the option's letter from the given choices directly.")
    assert items[0].question == "Context: Look closely.\nWhich is a mammal?"

    llava = tmp_path / "questions.jsonl"
    rows = [{"question_id": "q1", "image": "x.png", "text": "What is it?", "answers": ["cat", "cat", "kitten"]},
            {"question_id": "q2", "text": "Is it red?", "answer": "Yes", "category": "colour"},
            {"question_id": "q3", "image": "y.png", "text": "Pick", "options": {"A": "x", "B": "y"}, "answer": "B"}]
    llava.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(llava)
    assert [i.task for i in items] == ["open", "yesno", "mc"]
    assert items[0].answers == ["cat", "cat", "kitten"] and items[1].answer == "yes" and items[1].image is None
    with pytest.raises(ValueError, match="options"):
        EvalItem(id="x", task="mc", category="c", prompt="p", answer="Z", options={"A": "a"})


# -- scoring on a trained tiny export ---------------------------------------------------------------------


def test_answer_ids_are_the_trained_labels_and_end_with_the_stop_token():
    vlm = _vlm()
    ids = vlm.answer_ids("What colour?", "red")
    assert ids[-1] in vlm.stop_ids
    assert vlm.answer_ids("What colour?", "red", include_stop=False) == ids[:-1]


def test_option_loglikelihood_batched_equals_unbatched_forward():
    vlm = _vlm()
    item = load_items(_data() / "eval_mc.jsonl", limit=1)[0]
    pv = vlm.pixel_values([item.image])
    prompt = vlm.prompt_ids(item.prompt)
    conts = [vlm.answer_ids(item.prompt, k) for k in item.options] + [vlm.answer_ids(item.prompt, "a longer answer")]
    batched = vlm.continuation_logprobs(prompt, conts, pv)
    for c, lp in zip(conts, batched):
        with torch.no_grad():
            logits = vlm.model(input_ids=torch.tensor([prompt + c]), pixel_values=pv).logits[0].float()
        ref = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c)), torch.tensor(c)]
        np.testing.assert_allclose(lp, ref.double().numpy(), rtol=1e-4, atol=1e-4)
    rec = eval_lib.score_item(vlm, item)
    probs = rec["option_probs"]
    assert set(probs) == set(item.options) and sum(probs.values()) == pytest.approx(1.0)
    assert rec["prediction"] == max(probs, key=probs.get) and rec["confidence"] == pytest.approx(max(probs.values()))
    # first-token scoring: each option letter's first answer token, read from one forward of the prompt
    assert rec["scoring"] == "first_token"
    expected = np.array([batched[i][0] for i in range(len(item.options))])
    np.testing.assert_allclose(expected, [vlm.next_token_logprobs(prompt, pv)[c[0]] for c in conts[:4]],
                               rtol=1e-4, atol=1e-4)
    expected = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    np.testing.assert_allclose(list(probs.values()), expected, rtol=1e-4, atol=1e-6)
    assert rec["correct"] == (rec["prediction"] == item.answer)


def test_greedy_matches_transformers_generate():
    vlm = _vlm()
    item = load_items(_data() / "eval_open.jsonl", limit=1)[0]
    pv = vlm.pixel_values([item.image])
    prompt = vlm.prompt_ids(item.prompt)
    ids, logps, stopped = vlm.greedy(prompt, pv, max_new_tokens=6)
    ref = vlm.model.generate(input_ids=torch.tensor([prompt]), pixel_values=pv, do_sample=False, max_new_tokens=6,
                             eos_token_id=sorted(vlm.stop_ids), pad_token_id=vlm.tokenizer.pad_token_id or 0)
    new = ref[0, len(prompt):].tolist()
    if stopped:
        assert new[:len(ids) + 1] == ids + [new[len(ids)]] and new[len(ids)] in vlm.stop_ids
    else:
        assert new == ids and len(ids) == 6
    assert all(lp <= 0 for lp in logps)
    out = generate_lib.generate(vlm, item.prompt, item.image, max_new_tokens=6)
    assert out["token_ids"] == ids and out["confidence"] == pytest.approx(math.exp(np.mean(logps)))


def test_eval_cli_writes_records_and_summary(tmp_path):
    out, _ = finished_sweep()
    dest = tmp_path / "yesno.jsonl"
    assert eval_lib.main(["--model", str(out / BACKBONES[0] / "export"), "--data", str(_data() / "eval_yesno.jsonl"),
                          "--limit", "4", "--output", str(dest), "--no-progress"]) == 0
    recs = [json.loads(x) for x in dest.read_text().splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert set(r["option_probs"]) == {"yes", "no"} and sum(r["option_probs"].values()) == pytest.approx(1.0)
        assert r["correct"] == (r["prediction"] == r["answer"])
    summary = json.loads((tmp_path / "yesno.summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in recs]))
    assert summary["pope"]["yes_ratio"] == pytest.approx(np.mean([r["prediction"] == "yes" for r in recs]))


class _StubVLM:
    """Hand-built token log-probabilities: option "A" is one token (10), option "D" two (20, 21), as "D"
    was in the LLaMA-1 tiny tokenizer before its fix. D's first token is the more likely one."""

    TOKENS = {"A": [10], "D": [20, 21], "yes": [30], "Yes": [31], "no": [40], "No": [41]}
    LOGP = {10: -1.0, 20: -0.5, 21: -1.0, 30: -2.0, 31: -2.0, 40: -1.5, 41: -3.0}

    def prompt_ids(self, prompt, num_images=1):
        return [1, 2, 3]

    def answer_ids(self, prompt, answer, num_images=1, include_stop=True):
        return list(self.TOKENS[answer]) + ([2] if include_stop else [])

    def next_token_logprobs(self, prompt_ids, pixel_values):
        out = np.full(64, -50.0)
        for tok, lp in self.LOGP.items():
            out[tok] = lp
        return out

    def continuation_logprobs(self, prompt_ids, continuations, pixel_values, with_greedy=False):
        return [np.array([self.LOGP[t] for t in c]) for c in continuations]


def test_option_scoring_does_not_depend_on_the_number_of_tokens_of_an_option():
    vlm = _StubVLM()
    item = EvalItem(id="q", task="mc", category="colour", prompt="Which?\nA. red\nD. blue", answer="D",
                    options={"A": "red", "D": "blue"})
    summed = {k: sum(vlm.LOGP[t] for t in vlm.TOKENS[k]) for k in item.options}
    assert max(summed, key=summed.get) == "A"  # the unfair sum: D pays for its second token and loses
    first = eval_lib.score_choices(vlm, item, None, {k: (k,) for k in item.options})
    assert first["prediction"] == "D" and first["scoring"] == "first_token"
    assert first["option_probs"]["D"] == pytest.approx(1 / (1 + math.exp(-0.5)))
    mean = eval_lib.score_choices(vlm, item, None, {k: (k,) for k in item.options}, method="mean")
    assert mean["prediction"] == "D" and mean["option_logprobs"]["D"] == pytest.approx(-0.75)
    # yes/no: each label sums its two spellings' probabilities (first token of each)
    yn = eval_lib.score_choices(vlm, EvalItem(id="y", task="yesno", category="c", prompt="?", answer="no"), None,
                                eval_lib.YES_NO_SPELLINGS)
    assert yn["option_logprobs"]["yes"] == pytest.approx(np.logaddexp(-2.0, -2.0))
    assert yn["prediction"] == "no"


def test_option_scoring_falls_back_to_mean_when_labels_share_a_first_token():
    vlm = _StubVLM()
    vlm.TOKENS = {**vlm.TOKENS, "B": [20, 10]}  # B and D both start with token 20
    item = EvalItem(id="q", task="mc", category="c", prompt="?", answer="D", options={"B": "x", "D": "y"})
    out = eval_lib.score_choices(vlm, item, None, {k: (k,) for k in item.options})
    assert out["scoring"] == "mean"
    assert out["option_logprobs"] == pytest.approx({"B": -0.75, "D": -0.75})


class _RankStubVLM(_StubVLM):
    """_StubVLM that answers in option texts ("red" one token, "blue" two) and records what was asked."""

    TOKENS = {**_StubVLM.TOKENS, "red": [10], "blue": [20, 21]}

    def __init__(self):
        self.asked = []

    def prompt_ids(self, prompt, num_images=1):
        self.asked.append(prompt)
        return [1, 2, 3]

    def answer_ids(self, prompt, answer, num_images=1, include_stop=True):
        self.asked.append(prompt)
        return super().answer_ids(prompt, answer, num_images, include_stop)


def test_rank_scoring_asks_the_bare_question_and_length_normalises_the_option_texts():
    vlm = _RankStubVLM()
    item = EvalItem(id="q", task="mc", category="colour", prompt="Which?\nA. red\nD. blue\nAnswer with the letter.",
                    answer="D", options={"A": "red", "D": "blue"}, question="Which?")
    summed = {k: sum(vlm.LOGP[t] for t in vlm.TOKENS[v]) for k, v in item.options.items()}
    assert max(summed, key=summed.get) == "A"  # summed, blue pays for its second token and loses
    rec = eval_lib.score_item(vlm, item, option_scoring="rank")
    assert rec["prediction"] == "D" and rec["correct"] and rec["scoring"] == "rank"
    assert rec["option_logprobs"] == pytest.approx({"A": -1.0, "D": -0.75})  # mean over each text's tokens
    assert vlm.asked and set(vlm.asked) == {"Which?"}  # never the prompt with the options and the letter rule
    # the letter protocols still score the letters after the full prompt
    vlm.asked.clear()
    assert eval_lib.score_item(vlm, item, option_scoring="mean")["scoring"] == "mean"
    assert set(vlm.asked) == {item.prompt}
    # yes/no under rank: the answers are their own texts, scored as mean
    yn = eval_lib.score_item(vlm, EvalItem(id="y", task="yesno", category="c", prompt="?", answer="no"),
                             option_scoring="rank")
    assert yn["scoring"] == "mean" and yn["prediction"] == "no"


def test_rank_scoring_skips_an_item_without_a_bare_question_by_name():
    vlm = _RankStubVLM()
    items = [EvalItem(id="has", task="mc", category="c", prompt="Which?\nA. red\nD. blue", answer="A",
                      options={"A": "red", "D": "blue"}, question="Which?"),
             EvalItem(id="lacks", task="mc", category="c", prompt="Which?\nA. red\nD. blue", answer="A",
                      options={"A": "red", "D": "blue"})]
    skipped = []
    recs = eval_lib.evaluate(vlm, items, progress=False, option_scoring="rank", ablations=(), skipped=skipped)
    assert [r["id"] for r in recs] == ["has"]
    assert [s["id"] for s in skipped] == ["lacks"] and "question" in skipped[0]["reason"]
    with pytest.raises(ValueError, match="option scoring"):
        eval_lib.evaluate(vlm, items, progress=False, option_scoring="letters", ablations=())


def test_built_in_mc_items_carry_the_bare_question_that_starts_their_prompt():
    items = load_items(_data() / "eval_mc.jsonl")
    assert items and all(it.question and it.prompt.startswith(it.question + "\n") for it in items)
    assert all(v not in it.question for it in items for v in it.options.values() if len(v) > 1)


def test_tiny_tokenizers_keep_letters_yes_no_and_the_synthetic_words_whole():
    from barnfast.data import synthetic
    from barnfast.models.backbones import from_name

    words = [*synthetic.COLOURS, *synthetic.SHAPES, *map(str, synthetic.COUNTS), *synthetic.POSITIONS,
             "yes", "no", "Yes", "No", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    for name in ("llama1-tiny", "llama2-tiny", "llama3-tiny"):
        tok = from_name(name).load_tokenizer()
        # as chat.py tokenizes an answer: a continuation of a special token, " D" after "ASSISTANT:" in
        # vicuna / llama_2, "D" on its own after the header's "\n\n" segment in llama_3
        pre = "" if name == "llama3-tiny" else " "
        split = {w: tok.convert_ids_to_tokens(tok.encode(tok.eos_token + pre + w, add_special_tokens=False)[1:])
                 for w in words}
        bad = {w: t for w, t in split.items() if len(t) != 1}
        assert not bad, f"{name}: answers split into several tokens: {bad}"
        assert tok.bos_token_id == (1 if name != "llama3-tiny" else 128000) and len(tok) == (
            32000 if name != "llama3-tiny" else 128256)


@pytest.mark.parametrize("name", ["llama1-tiny", "llama2-tiny", "llama3-tiny"])
def test_option_lines_tokenize_as_the_real_llama_tokenizers_do(name):
    """Every option line of a multiple-choice prompt is newline, letter, ".", word, whichever word ends
    the line before it: the letter is one and the same token in each of the four places. The SentencePiece
    twins write a newline as the byte token <0x0A>, as LLaMA-1/2 do (no piece of theirs holds a newline);
    before, BPE merged newlines into neighbours ("\\nA", "e\\n"), so "C" after "▁b lu e\\n" and "\\nA" were
    different tokens for the same letter."""
    from barnfast.data import synthetic
    from barnfast.models.backbones import from_name

    tok = from_name(name).load_tokenizer()
    newline = "Ċ" if name == "llama3-tiny" else "<0x0A>"
    space = "Ġ" if name == "llama3-tiny" else "▁"
    for category in synthetic.CATEGORIES:
        domain = synthetic._domain(category)
        options = dict(zip("ABCD", domain[:4]))
        prompt = synthetic._mc_prompt(synthetic._mc_question(category), options)
        pieces = tok.convert_ids_to_tokens(tok.encode(prompt, add_special_tokens=False))
        for letter, word in options.items():
            start = pieces.index(letter)
            assert pieces[start - 1] in (newline, f"?{newline}"), (category, pieces)  # "?\n" is one llama3 piece
            assert pieces[start + 1] == "."
            # the word follows whole, after one space piece (" 1" is Ġ + 1 in llama3)
            assert "".join(pieces[start + 2:start + 4]).replace(space, " ").startswith(f" {word}"), (word, pieces)
        if name != "llama3-tiny":
            assert pieces.count("<0x0A>") == 5 and not any("\n" in p for p in pieces)


def test_eval_prompt_is_the_training_prompt_of_the_same_question():
    """The ids a stage-2 training sample has before its first labelled token (built with the trainer's own
    tokenizer, the backbone's, with <image> added) equal the export's evaluation prompt of that question."""
    from barnfast.data.chat import IGNORE_INDEX, encode_conversation
    from barnfast.models.backbones import from_name
    from barnfast.models.vlm import add_image_token

    vlm = _vlm()
    backbone = from_name(vlm.meta["backbone"])
    tok = backbone.load_tokenizer()
    image_token_id = add_image_token(tok)
    assert image_token_id == vlm.image_token_id
    # the tiny recipe trains with no system text; the export says so and its prompts follow
    system = load_recipe("llava15-tiny").train.system_prompt
    assert system == "" and vlm.system == system
    stage2 = json.loads((_data() / "stage2.json").read_text())
    checked = 0
    for rec in stage2:
        first = rec["conversations"][0]["value"]
        if "image" not in rec or not first.startswith("<image>\n"):
            continue
        ids, labels = encode_conversation(tok, backbone.chat_template, rec["conversations"][:2],
                                          image_token_id=image_token_id, num_image_tokens=vlm.num_image_tokens,
                                          system=system)
        start = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        # the eval items' prompt field is the bare question + instruction, the image placeholder goes first
        assert vlm.prompt_ids(first[len("<image>\n"):], 1) == ids[:start], rec["id"]
        checked += 1
    assert checked >= 5


def test_export_carries_the_chat_template_and_transformers_gives_the_same_ids():
    out, _ = finished_sweep()
    from transformers import AutoProcessor

    from barnfast.data.chat import encode_prompt
    from barnfast.data.images import load_image

    item = load_items(_data() / "eval_open.jsonl", limit=1)[0]
    for backbone in BACKBONES:
        vlm = ExportedVLM(out / backbone / "export", device="cpu")
        assert vlm.tokenizer.chat_template, f"{backbone}: the exported tokenizer has no chat_template"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.prompt}]},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "How many shapes are there?"}]
        got = vlm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        got = list(got["input_ids"] if hasattr(got, "keys") else got)
        conv = [{"from": "human", "value": "<image>\n" + item.prompt}, {"from": "gpt", "value": "red"},
                {"from": "human", "value": "How many shapes are there?"}]
        want = encode_prompt(vlm.tokenizer, vlm.template, conv, image_token_id=vlm.image_token_id, num_image_tokens=1,
                             system=vlm.system)
        assert got == want, backbone
        # a system message in the messages replaces the trained one, as encode_prompt's system= does
        with_system = [{"role": "system", "content": "Be brief."}, *messages]
        got = vlm.tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=True)
        got = list(got["input_ids"] if hasattr(got, "keys") else got)
        assert got == encode_prompt(vlm.tokenizer, vlm.template, conv, image_token_id=vlm.image_token_id,
                                    num_image_tokens=1, system="Be brief."), backbone
        # the processor expands <image> to the tower's slots: the full evaluation prompt, ids for ids
        proc = AutoProcessor.from_pretrained(out / backbone / "export")
        assert proc.chat_template == vlm.tokenizer.chat_template
        text = proc.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        # add_special_tokens=False: the template writes BOS itself (what apply_chat_template(tokenize=True) passes)
        ids = proc(text=text, images=load_image(item.image), add_special_tokens=False,
                   return_tensors="pt")["input_ids"][0].tolist()
        assert ids == vlm.prompt_ids(item.prompt, 1), backbone


def test_eval_cli_appends_per_item_resumes_and_lists_bad_items(tmp_path, monkeypatch):
    out, _ = finished_sweep()
    model = str(out / BACKBONES[0] / "export")
    data = tmp_path / "questions.jsonl"
    img = str((_data() / "images").resolve())
    good = [{"question_id": f"g{i}", "image": f"{img}/eval_yesno_{i:05d}.png", "text": "Is it red?",
             "answer": "no"} for i in range(4)]
    bad = [{"question_id": "no_image_file", "image": "missing.png", "text": "Is it red?", "answer": "yes"},
           {"question_id": "no_answer", "image": f"{img}/eval_mc_00000.png", "text": "What is it?"},
           {"question_id": "text_with_image", "text": "<image>\nWhat colour?", "answer": "red"},
           {"question_id": "mc_without_options", "image": f"{img}/eval_mc_00000.png", "answer": "B",
            "text": "Which colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in good[:2] + bad + good[2:]))
    dest = tmp_path / "eval" / "questions.jsonl"
    args = ["--model", model, "--data", str(data), "--output", str(dest), "--no-progress", "--max-new-tokens", "3"]

    # a crash at the 3rd good item leaves the first two records on disk, each written when it was scored
    real = eval_lib.score_item
    calls = []

    def crashing(vlm, item, *a, **k):
        calls.append(item.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(vlm, item, *a, **k)

    monkeypatch.setattr(eval_lib, "score_item", crashing)
    with pytest.raises(KeyboardInterrupt):
        eval_lib.main(args)
    first = [json.loads(x) for x in dest.read_text().splitlines()]
    assert [r["id"] for r in first] == ["g0", "g1"] and not eval_lib.summary_path(dest).exists()
    with open(dest, "a") as f:
        f.write('{"id": "g2", "task": "yes')  # a line cut by the crash
    monkeypatch.setattr(eval_lib, "score_item", real)
    assert eval_lib.main([*args, "--resume"]) == 0
    recs = [json.loads(x) for x in dest.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["g0", "g1", "g2", "g3"] and recs[:2] == first
    summary = json.loads(eval_lib.summary_path(dest).read_text())
    assert summary["n"] == 4 and summary["n_skipped"] == 4
    skipped = {s["id"]: s["reason"] for s in map(json.loads, eval_lib.skipped_path(dest).read_text().splitlines())}
    assert set(skipped) == {r["question_id"] for r in bad}
    assert "image not found" in skipped["no_image_file"] and "answer" in skipped["no_answer"]
    assert "<image>" in skipped["text_with_image"] and "options" in skipped["mc_without_options"]
    for r in recs:  # ablation controls on every item with an image
        assert set(r["ablation"]) == {"blank", "other"} and r["ablation"]["other"]["image"].startswith("image of g")
    assert set(summary["ablation"]["yesno"]) >= {"image", "blank", "other", "chance", "n"}
    with pytest.raises(SystemExit):
        eval_lib.parse_args([*args[:-2], "--max-new-tokens", "0"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        eval_lib.evaluate(ExportedVLM(model, device="cpu"), load_items(_data() / "eval_open.jsonl", limit=1), 0)


def test_generate_prints_a_hint_when_the_answer_is_empty():
    vlm = _vlm()
    assert generate_lib.empty_answer_hint({"text": "red", "token_ids": [5], "logprobs": [-0.1], "stopped": True},
                                          vlm) is None
    hint = generate_lib.empty_answer_hint({"text": "", "token_ids": [], "logprobs": [-0.2], "stopped": True}, vlm)
    assert hint.startswith("hint:") and "end-of-turn" in hint and "0.82" in hint
    hint = generate_lib.empty_answer_hint({"text": "", "token_ids": [vlm.tokenizer.bos_token_id], "logprobs": [-1, -1],
                                           "stopped": True}, vlm)
    assert "special tokens" in hint


def test_representation_stability_is_one_without_perturbation_and_lower_with_it():
    vlm = _vlm()
    items = load_items(_data() / "eval_open.jsonl", limit=4)
    same = eval_lib.representation_stability(vlm, items, kinds=("noise",), noise_std=0.0)
    np.testing.assert_allclose(same["cka"]["noise"], 1.0, atol=1e-9)
    moved = eval_lib.representation_stability(vlm, items, kinds=("noise",), noise_std=2.0)
    assert len(moved["cka"]["noise"]) == vlm.num_layers + 1 and min(moved["cka"]["noise"]) < 1.0 - 1e-6
    pv = torch.randn(1, 3, 8, 8)
    shifted = eval_lib.perturb(pv, "shift", (1.0, 1.0, 1.0))
    assert torch.equal(shifted[..., 1:], pv[..., :-1]) and torch.equal(shifted[..., 0], pv[..., 0])


# -- lmms-eval adapter over Instance stand-ins ----------------------------------------------------------


@dataclass
class FakeInstance:
    """What lmms-eval's Instance exposes to a model: ``args``."""

    args: tuple


def test_lmms_eval_adapter_on_a_fake_task():
    out, _ = finished_sweep()
    lm = BarnfastLMM(pretrained=str(out / BACKBONES[0] / "export"), device="cpu")
    items = load_items(_data() / "eval_mc.jsonl", limit=2)
    from barnfast.data.images import load_image

    docs = [{"image": load_image(it.image), "question": it.prompt, "answer": it.answer} for it in items]
    lm.task_dict = {"fake_mc": {"test": docs}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    reqs = [FakeInstance((d["question"], f" {letter}", visual, i, "fake_mc", "test"))
            for i, d in enumerate(docs) for letter in "AB"]
    res = lm.loglikelihood(reqs)
    vlm = lm.vlm
    for req, (ll, greedy) in zip(reqs, res):
        ctx, target, _, i, _, _ = req.args
        pv = vlm.pixel_values([docs[i]["image"]])
        cont = vlm.answer_ids(ctx, target.strip(), include_stop=False)
        lp = vlm.continuation_logprobs(vlm.prompt_ids(ctx), [cont], pv)[0]
        assert ll == pytest.approx(float(lp.sum())) and ll < 0 and isinstance(greedy, bool)
    gen = lm.generate_until([FakeInstance((docs[0]["question"], {"max_new_tokens": 5, "until": ["\n\n"]}, visual, 0,
                                           "fake_mc", "test"))])
    ids, _, _ = vlm.greedy(vlm.prompt_ids(docs[0]["question"]), vlm.pixel_values([docs[0]["image"]]), 5)
    assert gen == [vlm.decode(ids).split("\n\n")[0]]


def test_lmms_eval_registration_with_real_lmms_eval():
    """Runs where lmms-eval is importable (it is not a dependency): registered, real Instance objects."""
    pytest.importorskip("lmms_eval.api.registry", reason="lmms-eval is not installed")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import get_model

    from barnfast.evaluation import lmms_eval_adapter

    assert lmms_eval_adapter.HAS_LMMS_EVAL and issubclass(BarnfastLMM, lmms)
    assert get_model("barnfast") is BarnfastLMM
    out, _ = finished_sweep()
    lm = BarnfastLMM(pretrained=str(out / BACKBONES[0] / "export"), device="cpu")
    item = load_items(_data() / "eval_yesno.jsonl", limit=1)[0]
    from barnfast.data.images import load_image

    lm.task_dict = {"fake_yn": {"test": [{"image": load_image(item.image)}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    reqs = [Instance(request_type="loglikelihood", arguments=(item.prompt, ans, visual, 0, "fake_yn", "test"),
                     idx=i, metadata={"task": "fake_yn", "doc_id": 0, "repeats": 1})
            for i, ans in enumerate(("yes", "no"))]
    (ll_yes, _), (ll_no, _) = lm.loglikelihood(reqs)
    vlm, pv = lm.vlm, lm.vlm.pixel_values([item.image])
    for ans, ll in (("yes", ll_yes), ("no", ll_no)):
        cont = vlm.answer_ids(item.prompt, ans, include_stop=False)
        assert ll == pytest.approx(float(vlm.continuation_logprobs(vlm.prompt_ids(item.prompt), [cont], pv)[0].sum()))


def test_report_shows_the_ablation_control_intervals_and_a_header_without_none():
    from barnfast.evaluation import analyze

    out, _ = finished_sweep()
    result = analyze.build_report(out, stability_items=0)
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("Sweep: "))
    assert "None" not in header and "every stage run to its last epoch" not in header  # the sweep set --max-steps
    assert "at most 2 optimizer steps per stage" in header
    assert "### With and without the right image (image-ablation control)" in report
    assert (out / "figures" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    for b in BACKBONES:
        recs = [json.loads(x) for t in ("open", "mc", "yesno")
                for x in (out / b / "eval" / f"eval_{t}.jsonl").read_text().splitlines()]
        for task, e in result["ablation"][b].items():
            rows = [r for r in recs if r["task"] == task]
            assert e["n"] == len(rows)
            assert e["image"] == pytest.approx(np.mean([r["correct"] for r in rows]))
            assert e["blank"] == pytest.approx(np.mean([r["ablation"]["blank"]["correct"] for r in rows]))
            assert e["other"] == pytest.approx(np.mean([r["ablation"]["other"]["correct"] for r in rows]))
        assert result["ablation"][b]["mc"]["chance"] == pytest.approx(0.25)
        assert result["ablation"][b]["yesno"]["chance"] == pytest.approx(0.5)
        cell = result["accuracy_intervals"][b]["task"]["mc"]
        assert cell["lo"] <= cell["acc"] <= cell["hi"] and cell["n"] == 8
    lo, hi = analyze.wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35  # the Wilson interval is not degenerate at 0 successes (k/n ± se is)


class _ColourReader:
    """A stand-in model that answers colour questions from the pixels (the nearest palette colour of the
    non-background pixels), or ``blind=True``: always "red". What the ablation control must tell apart."""

    def __init__(self, blind: bool):
        from barnfast.data.synthetic import COLOURS

        self.blind, self.colours = blind, COLOURS
        self.words = ["none", *COLOURS]
        self.vision = type("V", (), {"image_size": 56})()

    def pixel_values(self, images):
        from barnfast.data.images import load_image

        img = images[0] if not isinstance(images[0], (str, Path)) else load_image(images[0])
        return torch.tensor(np.asarray(img.convert("RGB"), dtype=np.float64))  # (S, S, 3)

    def prompt_ids(self, prompt, num_images=1):
        return [1]

    def greedy(self, prompt_ids, pixel_values, max_new_tokens=16):
        arr = pixel_values.numpy()
        mask = np.abs(arr - arr[0, 0]).sum(-1) > 60
        if self.blind or not mask.any():
            word = "red" if self.blind else "none"
        else:
            fill = arr[mask].mean(0)
            word = min(self.colours, key=lambda c: np.abs(np.array(self.colours[c]) - fill).sum())
        return [self.words.index(word)], [-0.1, -0.1], True

    def decode(self, ids):
        return self.words[ids[0]]


@pytest.mark.parametrize("blind", [False, True])
def test_ablation_control_separates_a_model_that_reads_the_image_from_one_that_does_not(blind, tmp_path):
    from barnfast.data.synthetic import generate

    generate(tmp_path, num_stage1=0, num_stage2=0, num_eval=40, progress=False)
    items = [it for it in load_items(tmp_path / "eval_open.jsonl") if it.category == "colour"]
    assert len(items) >= 2
    recs = eval_lib.evaluate(_ColourReader(blind), items, progress=False)
    abl = eval_lib.summarize(recs)["ablation"]["open"]
    assert abl["n"] == len(items)
    others = [r["ablation"]["other"]["image"] for r in recs]
    assert all(o.startswith("image of ") and o != f"image of {r['id']}" for o, r in zip(others, recs))
    if blind:  # answers that ignore the image: every column the same, no answer changes
        assert abl["image"] == abl["blank"] == abl["other"] and abl["changed_other"] == 0.0
    else:  # reads the image: right with it, wrong with a blank, and with another image only where colours agree
        assert abl["image"] == 1.0 and abl["blank"] == 0.0
        agree = np.mean([r["ablation"]["other"]["prediction"] == r["answer"] for r in recs])
        assert abl["other"] == pytest.approx(agree) and abl["other"] <= 0.6 and abl["changed_other"] >= 0.4
