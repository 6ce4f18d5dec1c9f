"""Chat templates: LLaVA conversations → ``(input_ids, labels)``, built so labels cannot mismatch.

The original LLaVA code renders a conversation to one string, tokenizes it, then re-tokenizes each
round to find where the answers are; when the two disagree ("tokenization mismatch") it sets every
label of the sample to -100 and trains on nothing, silently. Here a conversation is first turned
into a list of *segments* (text, special token, image slots), each tagged labelled or not; each
segment is tokenized on its own and the ids are concatenated, so the labels are a by-product of the
ids and cannot disagree with them. Samples that cannot be encoded raise :class:`SampleError`,
which the data pipeline counts and reports by sample id.

A text segment that follows a special token or another text is tokenized as the continuation of a
special token (see :class:`_TextEncoder`): that reproduces what tokenizing the whole string would
give, e.g. no ``▁`` prefix on ``USER`` right after ``</s>`` for a Metaspace tokenizer with
``legacy=False``, ``▁USER`` with ``legacy=True``. The first text segment of a sequence, and the text
right after an image, are tokenized as the start of a text: LLaVA's ``tokenizer_image_token`` tokenizes
each chunk around ``<image>`` on its own, so with SentencePiece the chunk before an image may end with a
lone ``▁`` and the one after it starts with ``▁`` (``USER: ▁ <image> ▁ \\n What``). Special-token text in
the data (``</s>``, ``<|eot_id|>``) is tokenized as plain text, never as the special token.

Templates (the rendered text each one produces; ``{q}``/``{a}`` are the human/assistant values):

- ``plain`` (LLaVA stage 1, ``preprocess_plain``): ``<s><image>{a}\\n``. Human text other than the
  ``<image>`` placeholders is dropped; ``{a}\\n`` is labelled (no EOS, as LLaVA).
- ``vicuna_v1`` (``conv_vicuna_v1``): ``<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ...``;
  the system is LLaVA's v1 text ("... a curious user ..."), ``" {a}</s>"`` is labelled.
- ``llama_2`` (``conv_llava_llama_2``): ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a}
  </s><s>[INST] {q} [/INST] {a} </s>``; ``" {a} </s>"`` is labelled (the space before ``</s>`` too,
  as Meta's and LLaVA's format).
- ``llama_3`` (Meta's header format, LLaVA-NeXT's ``conv_llava_llama_3`` system): ``<|begin_of_text|>
  <|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|><|start_header_id|>user
  <|end_header_id|>\\n\\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>``;
  values are stripped as Meta's template does; ``{a}<|eot_id|>`` is labelled.
- ``llama_3_1`` (Meta's Llama 3.1 template, as LLaVA-MORE trains): ``llama_3`` with the system block always
  present, its text after :data:`LLAMA_3_1_SYSTEM_HEADER` (``Cutting Knowledge Date: December 2023\\n
  Today Date: 26 Jul 2024\\n\\n``).
- ``mistral`` (Mistral-7B-Instruct v0.2): ``<s>[INST] {q} [/INST] {a}</s>[INST] ...``; a system text,
  if given, goes before the first question with a blank line; ``" {a}</s>"`` is labelled.
- ``chatml`` (Qwen2): ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n
  <|im_start|>assistant\\n{a}<|im_end|>\\n``; no BOS; ``{a}<|im_end|>`` is labelled.

``image_at_turn_start=True`` moves each ``<image>`` to the start of its turn first, as LLaVA's
``preprocess_multimodal`` (the llava15 recipe's ``data.image_at_turn_start``); by default placeholders stay
where the data puts them. Where barnfast differs from LLaVA: an empty answer is a SampleError (LLaVA
zeroes such a sample through its round split); a conversation must end with an assistant turn.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from barnfast.errors import SampleError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
# Marks "a special token came just before" in a private copy of the tokenizer (see _TextEncoder); an
# added token from the Unicode private-use area, which no data text of LLaVA-665k contains.
_ANCHOR = "\ue000barnfast-anchor\ue000"
# Meta's Llama 3.1 chat template opens every system block with these two lines (tokenizer_config.json
# of Llama-3.1-*-Instruct, date_string defaulting to "26 Jul 2024"); LLaVA-MORE trains with it.
LLAMA_3_1_SYSTEM_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

_HUMAN = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass(frozen=True)
class _Text:
    text: str
    label: bool = False


@dataclass(frozen=True)
class _Special:
    token: str  # "$bos" / "$eos": the tokenizer's own; else a token string looked up by name
    label: bool = False


@dataclass(frozen=True)
class _Images:
    count: int  # placeholders; each becomes num_image_tokens slots, never labelled


_Segment = _Text | _Special | _Images
# (turns as (role, value) with role "human"/"gpt", system, add_generation_prompt) -> segments
_Render = Callable[[list[tuple[str, str]], str, bool], list[_Segment]]


@dataclass(frozen=True)
class ChatTemplate:
    """A named conversation format: its default system prompt and its segment renderer."""

    name: str
    default_system: str
    render: _Render
    uses_bos: bool = True


def _human(value: str) -> list[_Segment]:
    """A human value with each ``<image>`` as image slots."""
    out: list[_Segment] = []
    for i, piece in enumerate(value.split(IMAGE_PLACEHOLDER)):
        if i:
            out.append(_Images(1))
        if piece:
            out.append(_Text(piece))
    return out


def _render_plain(turns, system, gen):
    # LLaVA preprocess_plain: the human value becomes just the image; caption + "\n" is the target.
    n_images = turns[0][1].count(IMAGE_PLACEHOLDER)
    if n_images == 0:
        raise SampleError("plain template: the human turn has no <image> placeholder")
    segs: list[_Segment] = [_Special("$bos"), _Images(n_images)]
    if not gen:
        segs.append(_Text(turns[1][1] + "\n", label=True))
    return segs


def _render_vicuna_v1(turns, system, gen):
    segs: list[_Segment] = [_Special("$bos"), _Text(system + " " if system else "")]
    for role, value in turns:
        if role == "human":
            segs += [_Text("USER: "), *_human(value), _Text(" ASSISTANT:")]
        else:
            segs += [_Text(" " + value if value else "", label=True), _Special("$eos", label=True)]
    return segs


def _render_llama_2(turns, system, gen):
    segs: list[_Segment] = [_Special("$bos")]
    for i, (role, value) in enumerate(turns):
        if role == "human":
            if i:
                segs.append(_Special("$bos"))  # LLaVA's sep "<s>" opens every later round
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if (i == 0 and system) else ""
            segs += [_Text("[INST] " + sys_block), *_human(value), _Text(" [/INST]")]
        else:
            segs += [_Text(" " + value + " ", label=True), _Special("$eos", label=True)]
    return segs


def _render_llama_3(turns, system, gen):
    def header(role):
        return [_Special("<|start_header_id|>"), _Text(role), _Special("<|end_header_id|>"), _Text("\n\n")]

    segs: list[_Segment] = [_Special("$bos")]
    if system:
        segs += [*header("system"), _Text(system.strip()), _Special("<|eot_id|>")]
    for role, value in turns:
        if role == "human":
            segs += [*header("user"), *_human(value.strip()), _Special("<|eot_id|>")]
        else:
            segs += [
                *header("assistant"),
                _Text(value.strip(), label=True),
                _Special("<|eot_id|>", label=True),
            ]
    if gen:
        segs += header("assistant")
    return segs


def _render_llama_3_1(turns, system, gen):
    # Meta's 3.1 template: the system block is always there, its text after the two date lines.
    segs = _render_llama_3(turns, "", gen)
    header = [_Special("<|start_header_id|>"), _Text("system"), _Special("<|end_header_id|>"), _Text("\n\n")]
    block = [*header, _Text(LLAMA_3_1_SYSTEM_HEADER + system.strip()), _Special("<|eot_id|>")]
    return segs[:1] + block + segs[1:]


def _render_mistral(turns, system, gen):
    segs: list[_Segment] = [_Special("$bos")]
    for i, (role, value) in enumerate(turns):
        if role == "human":
            first = system + "\n\n" if (i == 0 and system) else ""
            segs += [_Text("[INST] " + first), *_human(value), _Text(" [/INST]")]
        else:
            segs += [_Text(" " + value if value else "", label=True), _Special("$eos", label=True)]
    return segs


def _render_chatml(turns, system, gen):
    def open_(role):
        return [_Special("<|im_start|>"), _Text(role + "\n")]

    segs: list[_Segment] = []
    if system:
        segs += [*open_("system"), _Text(system), _Special("<|im_end|>"), _Text("\n")]
    for role, value in turns:
        if role == "human":
            segs += [*open_("user"), *_human(value), _Special("<|im_end|>"), _Text("\n")]
        else:
            segs += [
                *open_("assistant"),
                _Text(value, label=True),
                _Special("<|im_end|>", label=True),
                _Text("\n"),
            ]
    if gen:
        segs += open_("assistant")
    return segs


_LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        ChatTemplate("plain", "", _render_plain),
        ChatTemplate(
            "vicuna_v1",
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            _render_vicuna_v1,
        ),
        ChatTemplate("llama_2", _LLAVA_SYSTEM, _render_llama_2),
        ChatTemplate("llama_3", _LLAVA_SYSTEM, _render_llama_3),
        ChatTemplate("llama_3_1", _LLAVA_SYSTEM, _render_llama_3_1),
        ChatTemplate("mistral", "", _render_mistral),
        ChatTemplate("chatml", "You are a helpful assistant.", _render_chatml, uses_bos=False),
    ]
}


def count_image_placeholders(conversations: list[dict]) -> int:
    """Number of ``<image>`` placeholders over all turns."""
    return sum(str(turn.get("value", "")).count(IMAGE_PLACEHOLDER) for turn in conversations)


def _turns(conversations: list[dict], *, for_prompt: bool) -> list[tuple[str, str]]:
    """Validated ``(role, value)`` pairs, role ``human``/``gpt``; SampleError names what is wrong."""
    if not conversations:
        raise SampleError("empty conversation")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(f"turn {i} is not a {{'from': ..., 'value': ...}} mapping")
        role = _HUMAN.get(str(turn["from"]).lower())
        if role is None:
            raise SampleError(f"turn {i} has unknown role {turn['from']!r}")
        if not isinstance(turn["value"], str):
            raise SampleError(f"turn {i} value is {type(turn['value']).__name__}, not text")
        turns.append((role, turn["value"]))
    if turns[0][0] != "human":
        raise SampleError("first turn is not from the human")
    for i, (role, _) in enumerate(turns):
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise SampleError(f"roles do not alternate human/assistant at turn {i}")
        if role == "gpt" and IMAGE_PLACEHOLDER in turns[i][1]:
            raise SampleError(f"turn {i}: <image> placeholder in an assistant turn")
        if role == "gpt" and not turns[i][1].strip():
            # LLaVA renders an empty answer without its end token, which breaks its round split and
            # zeroes the whole sample; barnfast skips it, with this reason, rather than train "</s>" alone.
            raise SampleError(f"turn {i}: empty answer")
    if for_prompt:
        if turns[-1][0] != "human":
            raise SampleError("a prompt must end with a human turn")
    else:
        if len(turns) < 2:
            raise SampleError("no assistant turn")
        if turns[-1][0] != "gpt":
            raise SampleError("conversation ends with a human turn that has no answer")
    return turns


def move_images_to_turn_start(value: str) -> str:
    """LLaVA's ``preprocess_multimodal`` on one turn: the ``<image>`` placeholders leave their place and
    open the turn, ``<image>\\n`` + the rest of the text, stripped (``"What is this? <image>"`` →
    ``"<image>\\nWhat is this?"``). A turn with ``n > 1`` placeholders keeps all ``n`` (LLaVA keeps one,
    which mismatches the images; LLaVA-1.5's data has one image per sample)."""
    n = value.count(IMAGE_PLACEHOLDER)
    if not n:
        return value
    rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
    return ((IMAGE_PLACEHOLDER + "\n") * n + rest).strip()


def _merge_text(segments: list[_Segment]) -> list[_Segment]:
    """Join neighbouring text segments of the same labelling, so that a word boundary never falls
    between two tokenizer calls (``"USER: "`` + ``"How"`` must give ``USER:``, ``▁How``, not a lone
    ``▁``)."""
    out: list[_Segment] = []
    for seg in segments:
        if isinstance(seg, _Text) and out and isinstance(out[-1], _Text) and out[-1].label == seg.label:
            out[-1] = _Text(out[-1].text + seg.text, seg.label)
        else:
            out.append(seg)
    return out


def _token_id(tokenizer, token: str, template: str) -> int:
    if token == "$bos":
        tid = tokenizer.bos_token_id
    elif token == "$eos":
        tid = tokenizer.eos_token_id
    else:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid == tokenizer.unk_token_id:
            tid = None
    if tid is None:
        raise ValueError(f"template {template!r} needs token {token!r}, which this tokenizer lacks")
    return tid


class _TextEncoder:
    """Tokenizes the text segments of one tokenizer, with special-token text in the data (``</s>``,
    ``<|eot_id|>``) as plain text, never as the special token.

    ``fresh(text)``: ``text`` as the start of a tokenizer call (the first text of a sequence, and the text
    after an ``<image>``, as LLaVA's ``tokenizer_image_token`` tokenizes each chunk: a Metaspace tokenizer
    prefixes ``▁``). ``after_special(text)``: ``text`` as it reads right after a special token inside one
    call (no ``▁`` for ``legacy=False`` / ``prepend_scheme="first"``, ``▁`` for ``legacy=True``), from a
    private copy of the fast tokenizer's backend that holds one extra, non-special added token
    (:data:`_ANCHOR`): ``encode(anchor + text)[1:]`` with special-token matching off
    (``encode_special_tokens``, what transformers' ``split_special_tokens=True`` sets). Added tokens cut the
    text the same way special ones do, so the anchor stands for any special token, while the data's
    ``</s>`` is split as text. The user's tokenizer is never changed.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None
        if backend is not None:
            from tokenizers import AddedToken, Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.add_tokens([AddedToken(_ANCHOR, special=False, normalized=False)])
            self.backend.encode_special_tokens = True
            self.anchor_id = self.backend.token_to_id(_ANCHOR)
        else:  # a slow (SentencePiece) tokenizer: its own split_special_tokens, eos as the anchor
            self.specials = [t for t in tokenizer.all_special_tokens if t]

    def fresh(self, text: str) -> list[int]:
        if self.backend is not None:
            return self._checked(self.backend.encode(text, add_special_tokens=False).ids, text)
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def after_special(self, text: str) -> list[int]:
        if self.backend is not None:
            ids = self._checked(self.backend.encode(_ANCHOR + text, add_special_tokens=False).ids, text)
            if not ids or ids[0] != self.anchor_id:
                raise ValueError("tokenizer did not keep the anchor token whole; cannot segment-encode")
            return ids[1:]
        found = [t for t in self.specials if t in text]
        if found:  # the slow path cannot split them and keep the continuation: say so, never merge them
            raise SampleError(f"special-token text {found[0]!r} in the data: a slow tokenizer cannot encode it "
                              "as plain text after a special token; use the fast tokenizer")
        eos = self.tokenizer.eos_token
        full = self.tokenizer.encode(eos + text, add_special_tokens=False)
        if not full or full[0] != self.tokenizer.eos_token_id:
            raise ValueError(f"tokenizer did not keep {eos!r} whole; cannot segment-encode")
        return full[1:]

    def _checked(self, ids: list[int], text: str) -> list[int]:
        if self.anchor_id in ids[1:]:
            raise SampleError(f"text contains barnfast's private anchor string {_ANCHOR!r}")
        return ids


# One _TextEncoder per tokenizer (building the backend copy takes ~0.1-0.5 s on a 128k vocabulary),
# rebuilt when tokens were added since (the trainer appends <image> before encoding).
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_encoder(tokenizer) -> _TextEncoder:
    try:
        cached = _ENCODERS.get(tokenizer)
    except TypeError:  # unhashable / not weak-referenceable: no cache
        return _TextEncoder(tokenizer)
    if cached is None or cached[0] != len(tokenizer):
        cached = (len(tokenizer), _TextEncoder(tokenizer))
        _ENCODERS[tokenizer] = cached
    return cached[1]


def _encode(tokenizer, template: str, conversations, image_token_id, num_image_tokens, system, gen,
            image_at_turn_start=False):
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    tpl = TEMPLATES[template]
    turns = _turns(conversations, for_prompt=gen)
    if template == "plain" and len(turns) != (1 if gen else 2):
        raise SampleError(f"plain template takes one human turn and one caption, got {len(turns)} turns")
    if image_at_turn_start:
        turns = [(role, move_images_to_turn_start(value)) for role, value in turns]
    segments = _merge_text(tpl.render(turns, tpl.default_system if system is None else system, gen))

    texts = _text_encoder(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    previous = None  # the segment before this one, a leading BOS aside
    for seg in segments:
        if isinstance(seg, _Images):
            new = [image_token_id] * (num_image_tokens * seg.count)
            label = False
        elif isinstance(seg, _Special):
            if seg.token == "$bos" and not tpl.uses_bos:
                continue
            if seg.token == "$bos" and tokenizer.bos_token_id is None:
                continue  # a tokenizer without BOS (Qwen2) gets none, whatever the template
            new = [_token_id(tokenizer, seg.token, template)]
            label = seg.label
        else:
            if not seg.text:
                continue
            # The start of a text and the chunk after an image are fresh tokenizer calls (LLaVA's
            # tokenize-per-chunk); text after a special token or another text reads as a continuation.
            fresh = previous is None or isinstance(previous, _Images)
            new = texts.fresh(seg.text) if fresh else texts.after_special(seg.text)
            label = seg.label
        leading_bos = isinstance(seg, _Special) and seg.token == "$bos" and not ids
        ids += new
        labels += new if label else [IGNORE_INDEX] * len(new)
        if not leading_bos:
            previous = seg
    return ids, labels


def encode_conversation(
    tokenizer,
    template: str,
    conversations: list[dict],
    *,
    image_token_id: int,
    num_image_tokens: int,
    system: str | None = None,
    image_at_turn_start: bool = False,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a LLaVA conversation, both of length T.

    ``conversations``: ``[{"from": "human"|"gpt"|"user"|"assistant", "value": str}, ...]``, human
    first, alternating, ending with an answer. Each ``<image>`` in a human turn becomes
    ``num_image_tokens`` copies of ``image_token_id``. ``labels`` is -100 except on the answers and
    the end-of-turn token after each (see the module docstring per template). ``system``: None for
    the template's default, "" for none. ``image_at_turn_start``: move each ``<image>`` to the start of
    its turn first (:func:`move_images_to_turn_start`, LLaVA's ``preprocess_multimodal``).

    Raises SampleError for an unusable conversation (the message names the reason), ValueError for
    an unknown template or a tokenizer that lacks the template's special tokens.
    """
    return _encode(tokenizer, template, conversations, image_token_id, num_image_tokens, system, False,
                   image_at_turn_start)


def encode_prompt(
    tokenizer,
    template: str,
    conversations: list[dict],
    *,
    image_token_id: int,
    num_image_tokens: int,
    system: str | None = None,
    image_at_turn_start: bool = False,
) -> list[int]:
    """Prompt ids for generation: the conversation (ending with a human turn) and the assistant
    prefix, tokenized exactly as :func:`encode_conversation` tokenizes the same prefix."""
    ids, _ = _encode(tokenizer, template, conversations, image_token_id, num_image_tokens, system, True,
                     image_at_turn_start)
    return ids
