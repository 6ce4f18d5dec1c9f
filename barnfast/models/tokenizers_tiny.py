"""Tokenizers for the ``-tiny`` backbones, built locally with the ``tokenizers`` library (no download).

Each one copies the *layout* of its family's real tokenizer, so chat templates, padding and stop
tokens behave as they do on the real checkpoint:

- ``sentencepiece`` (LLaMA-1/2, Vicuna, Mistral): Metaspace ``▁`` + BPE with byte fallback;
  ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<0x00>``..``<0xFF>``=3..258; 32000 entries. No piece holds a
  newline: it is always the byte token ``<0x0A>`` (13), and the word after it has no ``▁``.
- ``llama3`` / ``llama3.1``: byte-level BPE with Meta's pre-tokenizer regex; 128000 ordinary entries,
  then the 256 special tokens at 128000..128255 (``<|begin_of_text|>``=128000,
  ``<|end_of_text|>``=128001, ``<|start_header_id|>``=128006, ``<|end_header_id|>``=128007,
  ``<|eot_id|>``=128009; 128004 is ``<|reserved_special_token_2|>`` in Llama 3 and
  ``<|finetune_right_pad_id|>`` in Llama 3.1, as in the real files). 128256 entries.
- ``qwen2``: byte-level BPE with Qwen's regex (single digits); ``<|endoftext|>``=151643,
  ``<|im_start|>``=151644, ``<|im_end|>``=151645; 151646 entries, as the real tokenizer (the model's
  embedding has 152064 rows: Qwen pads it, the tokenizer does not).

The ordinary vocabulary is a BPE trained on :data:`CORPUS` (the synthetic dataset's words and the
chat templates' words, so they take a few tokens each), padded to the exact size with filler
entries that no merge can produce. Building takes well under a second; the serialised tokenizer is
cached per process and every call returns a fresh, independent ``PreTrainedTokenizerFast`` (callers
add ``<image>`` to theirs, which must not leak into the next caller's).
"""

from __future__ import annotations

import functools
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

# Words of the synthetic dataset (colours, shapes, counts, positions, questions) and of the chat
# templates' system prompts, so that both tokenize into a few tokens each.
CORPUS = (
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet teal",
    "circle square triangle rectangle star ellipse hexagon diamond pentagon oval cross heart shape shapes",
    "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10",
    "left right top bottom center centre middle upper lower corner above below next to beside near far",
    "What colour is the shape? What color is the shape? What shape is it? What is in the image?",
    "How many shapes are there? How many shapes are in the image? Where is the shape?",
    "Is there a red circle? Yes. No. There is a blue square in the top left corner of the image.",
    "The image shows a small green triangle on a white background. Describe the image briefly.",
    "There are two shapes: a large yellow star and a small purple hexagon at the bottom right.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    "You are a helpful assistant. USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> system user assistant",
    "a an the of in on at and or is are it this that with for from picture photo caption answer question",
    "large small big tiny medium dark light bright single word phrase short long first second third",
    # Answers start with a capital: "Red.", "Two.", "Circle."
    "Red Green Blue Yellow Orange Purple Pink Brown Black White Gray Grey Cyan Magenta Violet Teal",
    "Circle Square Triangle Rectangle Star Ellipse Hexagon Diamond Pentagon Oval Cross Heart",
    "Zero One Two Three Four Five Six Seven Eight Nine Ten Left Right Top Bottom Center Centre Middle",
    "There The It A An This Yes No How What Where Which Is Are Describe",
    # Answers as the real LLaMA tokenizers hold them whole ("▁D", "▁yes", "D", "yes" are one token in
    # both the 32000- and the 128256-entry vocabularies): every capital letter (option letters), and
    # lower-case yes / no. Without this line "D" took 2 tokens, "yes" 3 and "no" 2.
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z yes no",
)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Merges learned from CORPUS; the rest of the vocabulary is filler. 4000 covers every corpus word
# whole, with and without its leading space (~400 distinct words), while training in ~0.1 s.
_TRAIN_VOCAB = 4000


def _corpus() -> list[str]:
    # Every word also at a line start (answers follow "\n\n" in llama_3/chatml, where byte-level BPE
    # sees "Red", not " Red"); repeated so every pair is frequent enough to merge (min_frequency=2).
    starts = ["\n".join(line.split()) for line in CORPUS]
    return (list(CORPUS) + [" " + line for line in CORPUS] + starts) * 4


def _llama3_specials(v31: bool) -> list[str]:
    """The 256 special tokens of Llama 3 (``v31=False``) or Llama 3.1/3.2 (``True``), in id order."""
    if v31:
        named = {
            2: "<|reserved_special_token_0|>",
            3: "<|reserved_special_token_1|>",
            4: "<|finetune_right_pad_id|>",
            5: "<|reserved_special_token_2|>",
            8: "<|eom_id|>",
            10: "<|python_tag|>",
        }
        first_free_reserved = 3
    else:
        named = {
            2: "<|reserved_special_token_0|>",
            3: "<|reserved_special_token_1|>",
            4: "<|reserved_special_token_2|>",
            5: "<|reserved_special_token_3|>",
            8: "<|reserved_special_token_4|>",
        }
        first_free_reserved = 5
    named.update(
        {
            0: "<|begin_of_text|>",
            1: "<|end_of_text|>",
            6: "<|start_header_id|>",
            7: "<|end_header_id|>",
            9: "<|eot_id|>",
        }
    )
    out, r = [], first_free_reserved
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{r}|>")
            r += 1
    return out


def _sentencepiece_json(vocab_size: int) -> str:
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # SentencePiece never puts a newline inside a piece: LLaMA's vocabulary has no "\n" entry, so every
    # newline is the byte token <0x0A> and the word after it starts without "▁" ("\nA. red" is <0x0A> A . ▁red).
    # Without the split, BPE merged newlines into neighbours ("\nA", "e\n"): an option letter was "\nA",
    # or "C" after "▁b lu e\n", three different tokens for one letter, none of them the answer's "▁C".
    meta = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
    ])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = meta
    trainer_tok.train_from_iterator(
        _corpus(),
        BpeTrainer(vocab_size=_TRAIN_VOCAB, min_frequency=2, special_tokens=[], show_progress=False),
    )
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for t in specials + byte_tokens + sorted(trained["vocab"], key=trained["vocab"].get):
        if "\n" not in t:  # the trainer's alphabet holds "\n"; LLaMA's byte fallback encodes it as <0x0A>
            vocab.setdefault(t, len(vocab))
    for i in range(vocab_size - len(vocab)):
        vocab[f"<filler_{i}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = None
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # Already in the vocabulary at 0..2: registering them only makes them special (matched whole).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok.to_str()


def _byte_level_json(pattern: str, n_ordinary: int, specials: list[str], bos: str | None) -> str:
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre
    trainer_tok.train_from_iterator(
        _corpus(),
        BpeTrainer(
            vocab_size=_TRAIN_VOCAB,
            min_frequency=2,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))
    vocab = {t: i for i, t in enumerate(vocab)}
    for i in range(n_ordinary - len(vocab)):
        vocab[f"<filler_{i}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC() if bos is None else None  # Qwen2 normalises to NFC; Llama 3 does not
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, n_ordinary)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size(with_added_tokens=True) == n_ordinary + len(specials)
    return tok.to_str()


# kind -> (builder, special-token roles for the transformers wrapper)
_KINDS = {
    "sentencepiece": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"),
    "llama3": dict(
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|reserved_special_token_2|>"
    ),
    "llama3.1": dict(
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    ),
    "qwen2": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
}
KINDS = tuple(_KINDS)


@functools.cache
def _tokenizer(kind: str) -> Tokenizer:
    """The cached ``tokenizers.Tokenizer``; never handed out (the wrapper deep-copies it)."""
    return Tokenizer.from_str(_tokenizer_json(kind))


def _tokenizer_json(kind: str) -> str:
    if kind == "sentencepiece":
        return _sentencepiece_json(32000)
    if kind in ("llama3", "llama3.1"):
        return _byte_level_json(
            LLAMA3_PATTERN, 128000, _llama3_specials(kind == "llama3.1"), "<|begin_of_text|>"
        )
    if kind == "qwen2":
        return _byte_level_json(QWEN2_PATTERN, 151643, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    raise ValueError(f"unknown tiny tokenizer kind {kind!r}; known: {', '.join(KINDS)}")


def build_tiny_tokenizer(kind: str, **special_tokens: str | None) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of layout ``kind`` (one of :data:`KINDS`); ``special_tokens`` override the
    roles (``bos_token``, ``eos_token``, ``pad_token``, ...) set by default for that kind.

    ``len(tok)`` is the real tokenizer's size, so ``tok.add_special_tokens(
    {"additional_special_tokens": ["<image>"]})`` gives ``<image>`` the id ``len(tok)`` (32000 for
    the sentencepiece kind, 128256 for Llama 3).
    """
    backend = _tokenizer(kind)  # raises for an unknown kind
    roles = dict(_KINDS[kind])
    roles.update({k: v for k, v in special_tokens.items() if v is not None})
    # PreTrainedTokenizerFast deep-copies tokenizer_object, so the cached one is never mutated.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tok.model_max_length = 1 << 30  # the backbone's context is the packer's concern, not the tokenizer's
    return tok
