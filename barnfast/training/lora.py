"""LoRA for stage 2 (peft), merged back into plain Hugging Face weights for the export.

Idefics2 (§3.2) found LoRA on the LLM stabilises fine-tuning of a fully autoregressive VLM; in
stage 2 barnfast can train, instead of all LLM weights, a rank-r update ``W + (alpha/r)·B·A`` of
the decoder's linears, the projector staying fully trainable.

peft's ``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` of the language model *in
place* with a ``lora.Linear`` holding the original as ``base_layer``; the module tree is otherwise
unchanged, so ``model.hf.model.language_model`` is the same ``LlamaModel`` object and
``LlavaVLM.hidden_states`` calls its layers as before. Parameter names gain ``base_layer.`` and
``lora_A.default.``/``lora_B.default.``; :func:`merge_lora` folds the adapters into the base
weights and puts the original linears back, so ``model.hf.state_dict()`` has exactly the Hugging
Face keys again and :func:`barnfast.models.export.export_hf` writes a model that transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from barnfast.errors import ConfigError
from barnfast.models.vlm import LlavaVLM

ADAPTER = "default"
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """The recipe's ``[lora]`` table."""

    rank: int = 16
    """r: the adapters' inner dimension (trainable parameters per linear: r·(in + out))."""
    alpha: int = 32
    """Scale of the update: W + (alpha / rank)·B·A."""
    dropout: float = 0.05
    """Dropout on the adapters' input, in training only."""
    target_modules: tuple[str, ...] = LLAMA_LINEARS
    """Names (last path component) of the decoder linears that get adapters."""

    @classmethod
    def from_recipe(cls, section) -> LoraConfig:
        """From the recipe's ``[lora]`` table (:class:`barnfast.config.LoraSection`)."""
        return cls(rank=section.rank, alpha=section.alpha, dropout=section.dropout,
                   target_modules=tuple(section.target_modules))

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not all(isinstance(t, str) and t for t in self.target_modules) \
                or not self.target_modules:
            raise ConfigError(f"lora.target_modules must be a non-empty list of module names, "
                              f"got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)  # TOML gives a list


def _lora_layers(model: LlavaVLM):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.language_model.named_modules() if isinstance(m, LoraLayer)]


def apply_lora(model: LlavaVLM, cfg: LoraConfig) -> int:
    """Inject LoRA adapters into the language model; returns the number of trainable LoRA parameters.

    Freezes the whole language model and ``lm_head`` (LoRA parameters excepted); the vision tower
    and the projector are left as they are. Call it after ``model.set_trainable(projector=True,
    llm=...)``: ``set_trainable(llm=True)`` afterwards would unfreeze the base weights again.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if _lora_layers(model):
        raise RuntimeError("apply_lora: the language model already has LoRA adapters")
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none")
    lm = model.language_model
    try:
        injected = inject_adapter_in_model(peft_cfg, lm, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"lora.target_modules={list(cfg.target_modules)}: {exc}") from exc
    if injected is not lm:
        raise RuntimeError("peft returned a new language model instead of injecting in place")
    lm.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    n = 0
    for name, p in lm.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
            n += p.numel()
    return n


def merge_lora(model: LlavaVLM) -> None:
    """Fold every adapter into its base weight (W += (alpha/r)·B·A) and put the plain linear back.

    Afterwards ``model.hf.state_dict()`` has the keys it had before :func:`apply_lora`; the merged
    weights keep their ``requires_grad`` (frozen). No-op on a model without adapters.
    """
    _remove_lora(model, merge=True)


def unload_lora(model: LlavaVLM) -> None:
    """Put the plain base linears back *without* merging: the model is the base model again."""
    _remove_lora(model, merge=False)


def _remove_lora(model: LlavaVLM, merge: bool) -> None:
    for name, layer in _lora_layers(model):
        if merge:
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])  # safe: raises on non-finite merged weights
        parent_name, _, child = name.rpartition(".")
        parent = model.language_model.get_submodule(parent_name)
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise RuntimeError(f"merge_lora: {name} wraps a {type(base).__name__}, expected nn.Linear")
        setattr(parent, child, base)
    # peft records its config on the model it injected into; the merged model has no adapters left.
    model.language_model.__dict__.pop("peft_config", None)


def lora_state_dict(model: LlavaVLM) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed as in ``model.hf.state_dict()`` (``...q_proj.lora_A.default.weight``)."""
    return {k: v.detach() for k, v in model.hf.state_dict().items() if ".lora_" in k}
