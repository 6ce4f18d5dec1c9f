"""barnfast's kernels patched into a Hugging Face model *instance*, for HF ``Trainer``, TRL or your own loop.

    model = LlavaForConditionalGeneration.from_pretrained(...)
    apply_barnfast_kernels(model)  # projector, fused linear cross-entropy, Liger RMSNorm/RoPE/SwiGLU (CUDA)
    trainer = SFTTrainer(model=model, ...)

What changes, on this instance only (other models in the process, and the classes, are untouched):

- ``projector`` (``LlavaForConditionalGeneration`` only): ``model.model.multi_modal_projector`` becomes a
  :class:`~barnfast.kernels.ProjectorMLP` holding the *same* ``linear_1``/``linear_2`` modules (same
  Parameter objects, so an optimizer built before the patch still updates them).
- ``fused_linear_cross_entropy``: ``model.forward`` is bound on the instance. With ``labels`` it runs the
  body of the class's forward up to the last hidden states (``self.model(...)``, ``logits_to_keep``) and
  then ``barnfast.kernels.fused_linear_cross_entropy`` on the shifted hidden states and ``lm_head`` weight:
  the (B, T, V) logits are never materialised (at V = 32,064, T = 2,048, B = 8 that is 2 GiB in fp32 plus
  as much again for their gradient). The output has the class's type with ``logits=None``. Without
  ``labels`` the class's forward runs unchanged, so ``generate`` and evaluation logits are as before.
  The loss is Hugging Face's ``ForCausalLMLoss``: targets are ``labels[:, 1:]`` (or ``shift_labels``),
  ``ignore_index`` (default -100) is skipped, and the sum is divided by ``num_items_in_batch`` when the
  Trainer passes it (gradient accumulation over micro-batches), else by the count of non-ignored targets.
- ``liger``: :func:`barnfast.models.liger.apply_liger_to_decoder` on the decoder (CUDA and liger-kernel only;
  a no-op with a log line otherwise).

Outputs are built from the fields the installed transformers declares (``dataclasses.fields`` of the output
class, filled from the decoder output's fields of the same names), so a release that renames a field (5.24:
``past_key_values`` -> ``cache``, ``image_hidden_states`` -> ``image_outputs``) needs no change here; when
the forward or the outputs are not what this module relies on, patching raises a ``RuntimeError`` naming
the model class, the transformers version and the supported range (``barnfast.optional``).

Parameter names and ``state_dict`` keys do not change, so ``save_pretrained``/``from_pretrained`` work on a
patched model, and the checkpoint loads into an unpatched one. :func:`revert_barnfast_kernels` restores the
original projector module, the class's forward and (if this patch applied it) the decoder without Liger.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types

import torch
import torch.nn as nn
from transformers import LlavaForConditionalGeneration, PreTrainedModel

from barnfast import optional
from barnfast.kernels import ProjectorMLP
from barnfast.kernels import fused_linear_cross_entropy as _fused_linear_cross_entropy
from barnfast.models.liger import apply_liger_to_decoder, revert_liger

# Internals (not in transformers' public API): imported here, checked in apply_barnfast_kernels, so that a
# release that moves them gets the message naming the version and the supported range, not an ImportError.
try:
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaMultiModalProjector
except ImportError as exc:  # pragma: no cover - only on an unsupported transformers
    _INTERNALS_MISSING: ImportError | None = exc
else:
    _INTERNALS_MISSING = None

logger = logging.getLogger(__name__)

# *ForCausalLM families whose forward is exactly ``self.model(...) -> slice -> lm_head -> ForCausalLMLoss``
# (no logit softcapping or scaling after lm_head), so the fused loss reproduces it.
SUPPORTED_CAUSAL_LM = ("llama", "mistral", "qwen2")
# projector_hidden_act -> ProjectorMLP(approximate=...): exact erf GELU or its tanh approximation.
_GELU_APPROXIMATE = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}

_STATE = "_barnfast_patch"  # instance attribute (plain, not a buffer or module): what was patched


def apply_barnfast_kernels(
    model: PreTrainedModel,
    *,
    projector: bool = True,
    fused_linear_cross_entropy: bool = True,
    liger: bool = True,
    backend: str = "auto",
) -> dict[str, bool]:
    """Patch a ``LlavaForConditionalGeneration`` or a LLaMA-family ``*ForCausalLM`` instance in place.

    ``backend`` ("auto" | "triton" | "torch") goes to the kernels: "auto" runs Triton on CUDA tensors and
    the PyTorch path elsewhere. Returns what was applied, e.g. ``{"projector": True,
    "fused_linear_cross_entropy": True, "liger": False}`` (Liger needs CUDA; the projector does not apply to a
    text-only model). Patch before wrapping the model (DDP, FSDP, ``accelerate.prepare``). Calling it on a
    patched model raises ``ValueError``: revert first to change the options.
    """
    if getattr(model, _STATE, None) is not None:
        raise ValueError(
            f"model already patched by apply_barnfast_kernels ({getattr(model, _STATE)['applied']}); "
            "call revert_barnfast_kernels(model) first"
        )
    if _INTERNALS_MISSING is not None:
        raise optional.unsupported_transformers(
            f"apply_barnfast_kernels({type(model).__name__}): {_INTERNALS_MISSING}"
        ) from _INTERNALS_MISSING
    optional.warn_if_transformers_out_of_range("apply_barnfast_kernels")
    is_llava = isinstance(model, LlavaForConditionalGeneration)
    if not is_llava:
        model_type = getattr(model.config, "model_type", None)
        if not hasattr(model, "lm_head") or model_type not in SUPPORTED_CAUSAL_LM:
            raise ValueError(
                f"apply_barnfast_kernels: {type(model).__name__} (model_type {model_type!r}) is not "
                f"LlavaForConditionalGeneration or a *ForCausalLM of {SUPPORTED_CAUSAL_LM}"
            )
    if fused_linear_cross_entropy:  # checked before anything changes: no half-patched model
        _check_forward_and_output(model)
        if not isinstance(model.lm_head, nn.Linear):
            raise ValueError(
                f"fused_linear_cross_entropy needs lm_head to be nn.Linear, got {type(model.lm_head)}"
            )
        # PreTrainedModel.loss_function: an instance override, else LOSS_MAPPING[loss_type], else
        # ForCausalLMLoss (Llava's loss_type "ForConditionalGeneration" is not in the mapping: it falls back).
        loss_fn = LOSS_MAPPING.get(getattr(model, "loss_type", None), ForCausalLMLoss)
        if "_loss_function" in model.__dict__ or loss_fn is not ForCausalLMLoss:
            raise ValueError(
                "fused_linear_cross_entropy reproduces ForCausalLMLoss; this model has a custom loss "
                "(loss_type / _loss_function): pass fused_linear_cross_entropy=False"
            )
    state = {"applied": {"projector": False, "fused_linear_cross_entropy": False, "liger": False}}

    if projector and is_llava:
        state["projector"] = _swap_projector(model, backend)
        state["applied"]["projector"] = state["projector"] is not None

    if fused_linear_cross_entropy:
        state["previous_forward"] = model.__dict__.get("forward")  # e.g. a wrapper bound before; usually None
        state["backend"] = backend
        model.__dict__["forward"] = types.MethodType(_make_forward(type(model).forward), model)
        state["applied"]["fused_linear_cross_entropy"] = True

    if liger:
        decoder = model.model.language_model if is_llava else model.model
        already = getattr(decoder, "_barnfast_liger", None) is not None  # e.g. barnfast's build_model did it
        applied = apply_liger_to_decoder(decoder)
        state["liger_owned"] = applied and not already
        state["applied"]["liger"] = applied

    model.__dict__[_STATE] = state
    logger.info("barnfast kernels applied to %s: %s", type(model).__name__, state["applied"])
    return dict(state["applied"])


def revert_barnfast_kernels(model: PreTrainedModel) -> None:
    """Undo :func:`apply_barnfast_kernels` exactly: original projector module, forward, decoder.

    A no-op on an unpatched model.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    if state.get("projector") is not None:
        model.model.multi_modal_projector = state["projector"]
    if state["applied"]["fused_linear_cross_entropy"]:
        if state["previous_forward"] is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = state["previous_forward"]
    if state.get("liger_owned"):
        decoder = (
            model.model.language_model if isinstance(model, LlavaForConditionalGeneration) else model.model
        )
        revert_liger(decoder)


def _swap_projector(model: LlavaForConditionalGeneration, backend: str) -> nn.Module | None:
    """ProjectorMLP with the original's Linear modules; returns the original (for revert), or None."""
    old = model.model.multi_modal_projector
    if isinstance(old, ProjectorMLP):
        logger.info("projector not swapped: already a barnfast ProjectorMLP")
        return None
    act = model.config.projector_hidden_act
    if type(old) is not LlavaMultiModalProjector or act not in _GELU_APPROXIMATE:
        logger.warning(
            "projector not swapped: %s with projector_hidden_act=%r is not a 2-layer GELU MLP",
            type(old).__name__,
            act,
        )
        return None
    new = ProjectorMLP(
        old.linear_1.in_features,
        old.linear_1.out_features,
        old.linear_2.out_features,
        bias=old.linear_1.bias is not None,
        approximate=_GELU_APPROXIMATE[act],
        backend=backend,
        device="meta",
    )
    new.linear_1, new.linear_2 = old.linear_1, old.linear_2  # the same Parameters, not copies
    new.train(old.training)
    model.model.multi_modal_projector = new
    return old


def _make_forward(cls_forward):
    """A forward for one class; ``functools.wraps`` keeps the class forward's signature visible to
    ``inspect.signature`` (the Trainer reads it to keep dataset columns and to pass ``num_items_in_batch``).
    It holds no reference to a model instance, so ``copy.deepcopy(model)`` rebinds it to the copy."""
    signature = inspect.signature(cls_forward)

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return _fused_loss_forward(self, signature, *args, **kwargs)

    return forward


def _fused_loss_forward(self, signature: inspect.Signature, *args, **kwargs):
    state = self.__dict__[_STATE]
    bound = signature.bind(self, *args, **kwargs)
    if bound.arguments.get("labels") is None:  # logits wanted: the model's own forward, unchanged
        previous = state["previous_forward"]
        return (
            previous(*args, **kwargs) if previous is not None else type(self).forward(self, *args, **kwargs)
        )

    arguments = dict(bound.arguments)
    del arguments["self"]
    var_kw = next(n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD)
    extra = dict(arguments.pop(var_kw, {}))
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = self.config.return_dict

    # The class forward's body up to lm_head: every argument but labels/logits_to_keep goes to self.model,
    # including **kwargs (num_items_in_batch among them, as the class forward does).
    outputs = self.model(**arguments, **extra)
    hidden = _keep_positions(outputs[0], logits_to_keep)  # (B, T', H)
    loss = _causal_lm_loss(hidden, self.lm_head, labels, extra, state["backend"])
    out = _build_output(self, outputs, loss)
    return out if return_dict else out.to_tuple()


def _output_class(model: PreTrainedModel) -> type:
    return LlavaCausalLMOutputWithPast if isinstance(model, LlavaForConditionalGeneration) else CausalLMOutputWithPast


def _check_forward_and_output(model: PreTrainedModel) -> None:
    """What ``_fused_loss_forward`` relies on, checked at patch time: the class forward takes ``labels`` and
    ``**kwargs`` (its signature is what the patched forward binds), and the output class is a dataclass
    with ``loss`` and ``logits`` (set here; every other field is copied from the decoder's output)."""
    name = type(model).__name__
    parameters = inspect.signature(type(model).forward).parameters
    if "labels" not in parameters or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        raise optional.unsupported_transformers(f"{name}.forward{tuple(parameters)} (expected labels and **kwargs)")
    cls = _output_class(model)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if not {"loss", "logits"} <= fields:
        raise optional.unsupported_transformers(f"{name}: output class {cls.__name__} fields {sorted(fields)}")


def _build_output(model: PreTrainedModel, outputs, loss: torch.Tensor):
    """The class's output type with ``loss``, ``logits=None``, and every other field it declares taken from
    the decoder's output of the same name (``past_key_values`` or ``cache``, ``hidden_states``,
    ``attentions``, ``image_hidden_states`` or ``image_outputs``..., whatever this release calls them). A
    field the decoder output does not declare would be silently lost, so it is an error instead."""
    cls = _output_class(model)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("loss", "logits")]
    declared = {f.name for f in dataclasses.fields(outputs)} if dataclasses.is_dataclass(outputs) else set()
    missing = [n for n in names if n not in declared]
    if missing:
        raise optional.unsupported_transformers(
            f"{type(model).__name__}: {cls.__name__} declares {missing}, which the decoder's "
            f"{type(outputs).__name__} (fields {sorted(declared)}) does not"
        )
    return cls(loss=loss, logits=None, **{n: getattr(outputs, n) for n in names})


def _keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """``hidden[:, positions]`` as HF's forwards slice before ``lm_head``: an int k keeps the last k
    positions (0: all of them), a tensor holds the positions. (B, T, H) -> (B, T', H)."""
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, keep, :]


def _causal_lm_loss(
    hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, kwargs: dict, backend: str
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``lm_head(hidden)``, without the logits.

    hidden (B, T, H); labels (B, T) with ``ignore_index`` sentinels, or ``shift_labels`` (B, T) in kwargs
    (already shifted: target of position t). HF pads labels by one ignored column and takes ``[..., 1:]``,
    so the last position has no target: dropping it is the same loss with one fewer row.
    """
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        if labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match the kept positions {tuple(hidden.shape[:2])} "
                "(logits_to_keep with labels needs labels for the kept positions only)"
            )
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        target = shift_labels
    num_items = kwargs.get("num_items_in_batch")
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(hidden.device)
    return _fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head.weight,
        target.reshape(-1).to(hidden.device),
        bias=lm_head.bias,
        ignore_index=ignore_index,
        reduction="mean",
        num_target_tokens=num_items,
        backend=backend,
    )
