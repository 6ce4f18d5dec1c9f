"""The LLM backbone registry: one named entry per decoder, each with an offline ``-tiny`` twin.

An entry records what a controlled comparison needs to hold fixed or report: the Hugging Face id,
the architecture numbers (from each checkpoint's ``config.json``), the stage-2 chat template (stage
1 always uses ``plain``), the pad-token policy and the stop tokens.

Pad-token policy (the real tokenizers ship without a pad token, except Qwen2's):

- llama1, llama2, vicuna, mistral: ``<unk>`` (id 0), LLaVA's choice: it never occurs in text, so
  padding cannot alias a real token, and no embedding row is added.
- llama3: ``<|reserved_special_token_2|>`` (id 128004), the slot Llama 3.1 renamed
  ``<|finetune_right_pad_id|>``; Meta-Llama-3 has no token of that name, so asking for it would add
  a 128257th row.
- llama3.1: ``<|finetune_right_pad_id|>`` (id 128004), Meta's own pad token.
- qwen2: ``<|endoftext|>`` (id 151643), the real tokenizer's pad token.

A ``-tiny`` twin keeps the vocabulary size, the GQA ratio, the RoPE base and scaling, the context,
the weight tying and the special tokens (at their real ids: see :mod:`barnfast.models.tokenizers_tiny`);
it has width 64 (112 for Qwen2, whose ratio is 7), 2 layers, head_dim 16 and random weights.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import transformers

from barnfast.models.tokenizers_tiny import build_tiny_tokenizer

ALLOW_DOWNLOAD_ENV = "BARNFAST_ALLOW_DOWNLOAD"

# transformers model_type -> its config class
_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}
_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Tiny shape: head_dim 16, 2 layers; heads = 4 (Qwen2: 7, to keep its 28/4 ratio), kv = heads / ratio.
TINY_HEAD_DIM = 16
TINY_LAYERS = 2


class BackboneUnavailableError(RuntimeError):
    """A real backbone was asked for with no local weights and no permission to download."""


@dataclass(frozen=True)
class Backbone:
    """One LLM decoder: hub id, architecture, chat template, pad policy, stop tokens."""

    name: str
    """Registry name: ``llama3``, ``llama3-tiny``, ..."""
    family: str
    """transformers ``model_type``: ``llama``, ``mistral``, ``qwen2``."""
    hf_id: str | None
    """Hub id of the real checkpoint; None for tiny twins."""
    vocab_size: int
    """Rows of the embedding matrix (Qwen2: 152064, above its tokenizer's 151646)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = field(hash=False)
    """Llama 3.1's ``llama3`` frequency scaling, else None."""
    rms_norm_eps: float
    tie_word_embeddings: bool
    chat_template: str
    """Stage-2 template, a key of ``barnfast.data.chat.TEMPLATES`` (stage 1 uses ``plain``)."""
    bos_token: str | None
    eos_token: str
    pad_token: str
    """Token used to pad; see the module docstring for each entry's reason."""
    stop_tokens: tuple[str, ...]
    """Generation stops at any of these."""
    tiny: bool
    tiny_twin: str
    """Name of the ``-tiny`` twin; a tiny entry names itself."""
    tokenizer_kind: str = "sentencepiece"
    """Layout of the locally built tokenizer (``barnfast.models.tokenizers_tiny.KINDS``) for tiny twins."""
    variant: str = "base"
    """``base`` (pretrained only), ``chat`` or ``instruct`` (tuned to follow a chat template): a sweep should
    compare like with like, and the report states which each run used."""
    initializer_range: float = 0.02
    """Std of the random init (``config.initializer_range``): the checkpoints' 0.02, 1/sqrt(width) for tiny twins."""

    @property
    def gqa_ratio(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def text_config(self) -> transformers.PretrainedConfig:
        """The transformers config (LlamaConfig / MistralConfig / Qwen2Config) of this entry."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        tok_ids = self._special_ids()
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope,
            bos_token_id=tok_ids.get("bos"),
            eos_token_id=tok_ids.get("eos"),
            pad_token_id=tok_ids.get("pad"),
            initializer_range=self.initializer_range,
        )
        if self.family == "mistral":
            kwargs["sliding_window"] = None  # v0.2 dropped v0.1's 4096-token window
        if self.family == "qwen2":
            kwargs["use_sliding_window"] = False
        config = _CONFIGS[self.family](**kwargs)
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
        return config

    def _special_ids(self) -> dict[str, int]:
        """Ids of bos/eos/pad in this family's vocabulary (the same in the tiny tokenizer)."""
        return _SPECIAL_IDS[self.tokenizer_kind] | {"pad": _PAD_IDS[self.pad_token]}

    def load_tokenizer(self, model_path: str | None = None) -> transformers.PreTrainedTokenizerFast:
        """A fresh tokenizer with ``pad_token`` set per this entry's policy.

        ``model_path``: a local Hugging Face folder (read with ``local_files_only=True``). Without it,
        a tiny twin builds its tokenizer locally; a real entry downloads ``hf_id`` only when
        ``BARNFAST_ALLOW_DOWNLOAD=1``, else raises :class:`BackboneUnavailableError`.
        """
        if model_path is None and self.tiny:
            return build_tiny_tokenizer(
                self.tokenizer_kind,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
            )
        source, local = self._source(model_path)
        tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)
        if tok.pad_token is None:
            if self.pad_token not in tok.get_vocab():
                raise ValueError(
                    f"{self.name}: pad token {self.pad_token!r} is not in the tokenizer at {source}; "
                    "set one in its tokenizer_config.json"
                )
            tok.pad_token = self.pad_token
        return tok

    def load_model(
        self, model_path: str | None = None, *, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> transformers.PreTrainedModel:
        """The ``*ForCausalLM``: from ``model_path`` (local folder), else random weights from
        ``seed`` for a tiny twin (same seed, same weights), else the hub under the rules of
        :meth:`load_tokenizer`."""
        if model_path is None and self.tiny:
            config = self.text_config()
            # fork_rng: building the model must not move the caller's global RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            return model.to(dtype)
        source, local = self._source(model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=local, dtype=dtype)
        if model.config.model_type != self.family:
            raise ValueError(
                f"{self.name}: {source} holds a {model.config.model_type!r} model, "
                f"but backbone {self.name!r} is {self.family!r}"
            )
        return model

    def _source(self, model_path: str | None) -> tuple[str, bool]:
        """(where to load from, local_files_only)."""
        if model_path is not None:
            if not os.path.isdir(model_path):
                raise BackboneUnavailableError(
                    f"{self.name}: --model-path {model_path!r} is not a folder; give a local Hugging Face "
                    "checkpoint folder (config.json, tokenizer files, *.safetensors)"
                )
            return model_path, True
        if os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
            return self.hf_id, False
        raise BackboneUnavailableError(
            f"backbone {self.name!r} needs the weights of {self.hf_id}, and barnfast does not download "
            f"by default. Pass --model-path /path/to/local/hf/folder (a Hugging Face checkpoint folder), "
            f"or set {ALLOW_DOWNLOAD_ENV}=1 to fetch {self.hf_id} from the hub. To run offline with random "
            f"weights and the same architecture family, use --backbone {self.tiny_twin}."
        )


_SPECIAL_IDS = {
    "sentencepiece": {"bos": 1, "eos": 2},
    "llama3": {"bos": 128000, "eos": 128009},
    "llama3.1": {"bos": 128000, "eos": 128009},
    "qwen2": {"eos": 151645},
}
_PAD_IDS = {
    "<unk>": 0,
    "<|reserved_special_token_2|>": 128004,
    "<|finetune_right_pad_id|>": 128004,
    "<|endoftext|>": 151643,
}

_SP = dict(
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<unk>",
    stop_tokens=("</s>",),
    tokenizer_kind="sentencepiece",
)
_REAL = [
    # LLaMA-1 7B: no chat model of its own; LLaVA trained it with the Vicuna v1 template.
    Backbone(
        name="llama1",
        family="llama",
        hf_id="huggyllama/llama-7b",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        chat_template="vicuna_v1",
        tiny=False,
        tiny_twin="llama1-tiny",
        **_SP,
    ),
    # LLaMA-2 7B base with LLaVA's conv_llava_llama_2 ([INST] <<SYS>> ...) template.
    Backbone(
        name="llama2",
        family="llama",
        hf_id="meta-llama/Llama-2-7b-hf",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        chat_template="llama_2",
        tiny=False,
        tiny_twin="llama2-tiny",
        **_SP,
    ),
    # Vicuna v1.5 7B (LLaMA-2 fine-tune): LLaVA-1.5's default LLM and template.
    Backbone(
        name="vicuna",
        family="llama",
        hf_id="lmsys/vicuna-7b-v1.5",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        chat_template="vicuna_v1",
        tiny=False,
        tiny_twin="vicuna-tiny",
        variant="chat",
        **_SP,
    ),
    Backbone(
        name="llama3",
        family="llama",
        hf_id="meta-llama/Meta-Llama-3-8B-Instruct",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        chat_template="llama_3",
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|reserved_special_token_2|>",
        stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
        tiny=False,
        tiny_twin="llama3-tiny",
        tokenizer_kind="llama3",
        variant="instruct",
    ),
    Backbone(
        name="llama3.1",
        family="llama",
        hf_id="meta-llama/Llama-3.1-8B-Instruct",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=dict(_LLAMA31_ROPE),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        chat_template="llama_3_1",  # Meta's 3.1 system header, as LLaVA-MORE trains
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        stop_tokens=("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
        tiny=False,
        tiny_twin="llama3.1-tiny",
        tokenizer_kind="llama3.1",
        variant="instruct",
    ),
    # Mistral 7B Instruct v0.2: LLaMA-2 tokenizer layout, GQA 32/8, RoPE 1e6, no sliding window.
    Backbone(
        name="mistral",
        family="mistral",
        hf_id="mistralai/Mistral-7B-Instruct-v0.2",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        chat_template="mistral",
        tiny=False,
        tiny_twin="mistral-tiny",
        variant="instruct",
        **_SP,
    ),
    # Qwen2 7B Instruct: ChatML, no BOS, GQA 28/4, RoPE 1e6, q/k/v biases (Qwen2Config's own).
    Backbone(
        name="qwen2",
        family="qwen2",
        hf_id="Qwen/Qwen2-7B-Instruct",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        chat_template="chatml",
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        tiny=False,
        tiny_twin="qwen2-tiny",
        tokenizer_kind="qwen2",
        variant="instruct",
    ),
]


def _variant(entry: Backbone, name: str, hf_id: str, variant: str) -> Backbone:
    return dataclasses.replace(entry, name=name, hf_id=hf_id, variant=variant, tiny_twin=f"{name}-tiny")


_BY_NAME = {b.name: b for b in _REAL}
# Base and tuned checkpoints of each generation: same architecture, tokenizer and template (LLaVA trains
# both with the generation's template), different weights. The Llama-3 names were the Instruct checkpoints
# before these entries existed: ``llama3`` / ``llama3.1`` now name the base models, ``-instruct`` the tuned ones.
_REAL += [
    _variant(_BY_NAME["llama2"], "llama2-chat", "meta-llama/Llama-2-7b-chat-hf", "chat"),
    _variant(_BY_NAME["llama3"], "llama3-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "instruct"),
    _variant(_BY_NAME["llama3.1"], "llama3.1-instruct", "meta-llama/Llama-3.1-8B-Instruct", "instruct"),
]
_REAL[[b.name for b in _REAL].index("llama3")] = _variant(_BY_NAME["llama3"], "llama3", "meta-llama/Meta-Llama-3-8B",
                                                          "base")
_REAL[[b.name for b in _REAL].index("llama3.1")] = _variant(_BY_NAME["llama3.1"], "llama3.1", "meta-llama/Llama-3.1-8B",
                                                            "base")


def _tiny(real: Backbone) -> Backbone:
    heads = 4 if real.gqa_ratio <= 4 else real.gqa_ratio  # smallest head count that keeps the ratio
    hidden = heads * TINY_HEAD_DIM
    return dataclasses.replace(
        real,
        name=real.tiny_twin,
        hf_id=None,
        hidden_size=hidden,
        # keep the real MLP expansion (11008/4096 = 2.69, 14336/4096 = 3.5), rounded to a multiple of 8
        intermediate_size=8 * round(hidden * real.intermediate_size / real.hidden_size / 8),
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=heads // real.gqa_ratio,
        rope_scaling=None if real.rope_scaling is None else dict(real.rope_scaling),
        # The real models' 0.02 is ~1.3/sqrt(4096); at width 64 it leaves every activation and attention logit
        # ~8x too small, attention stays uniform and a random-init decoder learns the answer priors only. At
        # 1/sqrt(width) = 0.125 a 2-layer decoder learns "<statement> Are the shapes blue?" yes/no in text from
        # 0.55 to 0.98 accuracy in 750 steps of 32 (at 0.02: 0.55 after 1,500 steps).
        initializer_range=hidden ** -0.5,
        tiny=True,
    )


BACKBONES: dict[str, Backbone] = {}
for _b in _REAL:
    BACKBONES[_b.name] = _b
    BACKBONES[_b.tiny_twin] = _tiny(_b)


def from_name(name: str) -> Backbone:
    """The registry entry ``name``; an unknown name raises ValueError listing every known one."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}") from None
