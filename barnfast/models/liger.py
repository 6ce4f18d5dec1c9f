"""Liger-Kernel's RMSNorm, RoPE and SwiGLU patched into one decoder's *instances* (CUDA only).

What changes, per module instance of the given language model (nothing else in the process):

- every ``*RMSNorm`` (``input_layernorm``, ``post_attention_layernorm``, the final ``norm``):
  ``forward`` → ``LigerRMSNorm.forward`` (one Triton kernel, fp32 math, "llama" casting), with the
  attributes it reads (``offset=0``, ``casting_mode``, ``in_place``, ...) set on the instance;
- every ``mlp``: ``forward`` → ``LigerSwiGLUMLP.forward`` (``down(silu(gate(x)) * up(x))`` with the
  SiLU-multiply fused; the same ``gate_proj``/``up_proj``/``down_proj`` Linears);
- every ``self_attn``: ``forward`` → the *same code* as its class's forward (and its decorators),
  with a copy of its globals where ``apply_rotary_pos_emb`` is ``liger_rotary_pos_emb``. Liger's own
  ``apply_liger_kernel_to_llama(model=...)`` swaps the module-level function instead, which changes
  every Llama in the process; this keeps the swap to this model's layers. A probe call per attention
  class checks that the forward really calls that function (transformers 5.24 wraps it in
  ``deprecate_kwarg``, so reading its bytecode finds nothing); if not, patching raises naming the class,
  the transformers version and the supported range, before any module is changed.

Each patched forward sends CUDA inputs to the kernel and anything else to the class's own forward
(Triton kernels need CUDA; a CUDA machine still runs CPU tests on models ``build_model`` patched).
Bound methods live in each instance's ``__dict__``: no module is replaced, so parameter names and
``state_dict`` keys are unchanged and checkpoints load as before; the patch is independent of the
device, so a model built on CPU and moved to CUDA afterwards runs the kernels; :func:`revert_liger`
deletes the bound methods again. Liger's cross-entropy and fused linear cross-entropy are *not*
applied: barnfast computes its loss with ``barnfast.kernels.fused_linear_cross_entropy`` from the
final hidden states and never calls the Hugging Face ``*ForCausalLM.forward``.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from barnfast import optional

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
_PATCHED = "_barnfast_liger"  # instance attribute on the language model: the kernels it was patched with


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


@dataclass(frozen=True)
class DecoderKernels:
    """What to put into a decoder. Tests pass pure-PyTorch twins to check the mechanism on CPU."""

    name: str
    rms_norm_forward: Callable
    """Unbound ``forward(self, hidden_states)`` for an RMSNorm instance."""
    rms_norm_attrs: dict
    """Attributes ``rms_norm_forward`` reads from the instance (besides ``weight``, ``variance_epsilon``)."""
    mlp_forward: Callable
    """Unbound ``forward(self, x)`` for a gated MLP with ``gate_proj``/``up_proj``/``down_proj``."""
    rotary_fn: Callable
    """Drop-in for transformers' ``apply_rotary_pos_emb(q, k, cos, sin)``."""
    applies_to: Callable[[torch.Tensor], bool] = _on_cuda
    """Whether the kernels take this input; otherwise the class's own forward runs (CPU tensors:
    a CUDA machine also runs CPU-only tests on models that build_model patched)."""


def liger_kernels() -> DecoderKernels:
    """Liger's RMSNorm / SwiGLU / RoPE modules and function, as Liger patches instances with them."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    return DecoderKernels(
        name="liger",
        rms_norm_forward=LigerRMSNorm.forward,
        # Llama, Mistral and Qwen2: no weight offset, Llama casting (fp32 norm, cast to the input dtype
        # before the weight multiply), as Liger's _patch_rms_norm_module sets for them.
        rms_norm_attrs=dict(
            offset=0.0, casting_mode="llama", in_place=True, row_mode=None, impl=None, mode=None
        ),
        mlp_forward=LigerSwiGLUMLP.forward,
        rotary_fn=liger_rotary_pos_emb,
    )


def apply_liger_to_decoder(language_model: nn.Module, kernels: DecoderKernels | None = None) -> bool:
    """Patch ``language_model`` (a ``LlamaModel`` / ``MistralModel`` / ``Qwen2Model``, i.e. the part
    with ``.layers`` and ``.norm``) with Liger's kernels. Returns whether it patched; logs why not.

    ``kernels`` overrides the Liger kernels (tests); when given, ``optional.HAS_LIGER`` is not asked.
    """
    family = getattr(getattr(language_model, "config", None), "model_type", None)
    if kernels is None and not optional.HAS_LIGER:
        logger.info(
            "Liger kernels not applied: %s", optional.WHY_NOT.get("liger", "liger-kernel unavailable")
        )
        return False
    if family not in SUPPORTED_FAMILIES:
        logger.info("Liger kernels not applied: model family %r is not one of %s", family, SUPPORTED_FAMILIES)
        return False
    if getattr(language_model, _PATCHED, None) is not None:
        logger.info("Liger kernels already applied (%s)", getattr(language_model, _PATCHED))
        return True
    if getattr(language_model.config, "hidden_act", "silu") not in ("silu", "swish"):
        logger.info(
            "Liger kernels not applied: SwiGLU needs hidden_act silu, got %r",
            language_model.config.hidden_act,
        )
        return False
    kernels = kernels or liger_kernels()
    optional.warn_if_transformers_out_of_range("apply_liger_to_decoder")
    for layer in language_model.layers:  # raises on unrecognised attention before any module changes
        _check_rotary_hook(layer.self_attn)
    norms = [language_model.norm]
    for layer in language_model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        _bind_forward(layer.mlp, kernels.mlp_forward, kernels.applies_to)
        _patch_rotary(layer.self_attn, kernels.rotary_fn, kernels.applies_to)
    for norm in norms:
        norm.__dict__.update(kernels.rms_norm_attrs)
        _bind_forward(norm, kernels.rms_norm_forward, kernels.applies_to)
    # A plain attribute, not a buffer: state_dict is untouched.
    language_model.__dict__[_PATCHED] = kernels.name
    logger.info(
        "Liger kernels applied to %d %s decoder layers: RMSNorm, RoPE, SwiGLU",
        len(language_model.layers),
        family,
    )
    return True


def _bind_forward(module: nn.Module, kernel_forward: Callable, applies_to: Callable) -> None:
    """``module.forward`` → ``kernel_forward`` on inputs ``applies_to`` accepts, else the class's forward."""
    cls_forward = type(module).forward

    def forward(self, x, *args, **kwargs):
        return (kernel_forward if applies_to(x) else cls_forward)(self, x, *args, **kwargs)

    module.__dict__["forward"] = types.MethodType(forward, module)


def _patch_rotary(attn: nn.Module, rotary_fn: Callable, applies_to: Callable) -> None:
    """Bind to ``attn`` its class's forward, with ``apply_rotary_pos_emb`` resolved to ``rotary_fn``.

    The forward is found by behaviour, not by its source: :func:`_with_rotary` rebuilds the class's
    forward (through decorators such as 5.24's ``deprecate_kwarg``) against globals where the name
    ``apply_rotary_pos_emb`` is a given function, and :func:`_check_rotary_hook` calls that rebuild once
    per attention class with a recording function that stops the call: if it is not reached, RoPE is
    not patched and the error names the class, the transformers version and the supported range.
    """
    cls = type(attn)
    _check_rotary_hook(attn)
    original = inspect.unwrap(cls.forward).__globals__["apply_rotary_pos_emb"]

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        return (rotary_fn if applies_to(q) else original)(q, k, cos, sin, *args, **kwargs)

    attn.__dict__["forward"] = types.MethodType(_with_rotary(cls.forward, apply_rotary_pos_emb), attn)


_ROTARY_HOOK_CHECKED: set[type] = set()  # attention classes whose forward was seen to call the hook


def _with_rotary(fn: Callable, rotary: Callable) -> types.FunctionType:
    """A copy of ``fn`` whose innermost function sees ``apply_rotary_pos_emb = rotary``.

    Decorators made with ``functools.wraps`` hold the function they wrap in a closure cell and name it
    in ``__wrapped__``: each is copied with that cell pointing at the rebuilt inner function, so what the
    decorators do (renaming deprecated keyword arguments) is kept.
    """
    if not isinstance(fn, types.FunctionType):
        raise optional.unsupported_transformers(f"{fn!r} is not a plain function")
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is None:
        new = types.FunctionType(
            fn.__code__, {**fn.__globals__, "apply_rotary_pos_emb": rotary}, fn.__name__, fn.__defaults__,
            fn.__closure__,
        )
    else:
        cells = fn.__closure__ or ()
        at = [i for i, c in enumerate(cells) if _cell_contents(c) is wrapped]
        if len(at) != 1:
            raise optional.unsupported_transformers(
                f"decorator {fn.__qualname__} around {wrapped.__qualname__} does not hold it in one closure cell"
            )
        inner = _with_rotary(wrapped, rotary)
        closure = tuple(types.CellType(inner) if i == at[0] else c for i, c in enumerate(cells))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        new.__wrapped__ = inner
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "__wrapped__"})
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


class _RotaryReached(Exception):
    """Raised by the probe's RoPE function: the forward called it, nothing after it needs to run."""


def _check_rotary_hook(attn: nn.Module) -> None:
    """Call the rebuilt forward once on 2 positions of zeros, with a RoPE function that raises
    :class:`_RotaryReached`. Only q/k/v projections run (a few kB of work; on meta tensors for a model
    built on the meta device); the attention kernel, which may need packing metadata, is never reached."""
    cls = type(attn)
    if cls in _ROTARY_HOOK_CHECKED:
        return
    name = cls.__qualname__
    inner = inspect.unwrap(cls.forward)
    if not isinstance(inner, types.FunctionType) or "apply_rotary_pos_emb" not in inner.__globals__:
        raise optional.unsupported_transformers(
            f"{name}.forward has no module-level apply_rotary_pos_emb to patch RoPE through"
        )

    def reached(q, k, cos, sin, *args, **kwargs):
        raise _RotaryReached

    head_dim = getattr(attn, "head_dim", None)
    q_proj = getattr(attn, "q_proj", None)
    if head_dim is None or not isinstance(q_proj, nn.Linear):
        raise optional.unsupported_transformers(f"{name} has no head_dim / q_proj Linear")
    weight = q_proj.weight
    hidden = torch.zeros(1, 2, q_proj.in_features, device=weight.device, dtype=weight.dtype)  # (B, T, H)
    cos = torch.ones(1, 2, head_dim, device=weight.device, dtype=weight.dtype)  # (B, T, D)
    probe = _with_rotary(type(attn).forward, reached)
    try:
        with torch.no_grad():
            probe(attn, hidden_states=hidden, position_embeddings=(cos, torch.zeros_like(cos)), attention_mask=None)
    except _RotaryReached:
        _ROTARY_HOOK_CHECKED.add(cls)
        return
    except Exception as exc:
        raise optional.unsupported_transformers(
            f"{name}.forward failed before RoPE in barnfast's probe call ({type(exc).__name__}: {exc})"
        ) from exc
    raise optional.unsupported_transformers(f"{name}.forward does not call apply_rotary_pos_emb; cannot patch RoPE")


def revert_liger(language_model: nn.Module) -> None:
    """Undo :func:`apply_liger_to_decoder`: the class methods are visible again."""
    if getattr(language_model, _PATCHED, None) is None:
        return
    norms = [language_model.norm]
    for layer in language_model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        layer.mlp.__dict__.pop("forward", None)
        layer.self_attn.__dict__.pop("forward", None)
    for norm in norms:
        norm.__dict__.pop("forward", None)
        for attr in ("offset", "casting_mode", "in_place", "row_mode", "impl", "mode"):
            norm.__dict__.pop(attr, None)
    del language_model.__dict__[_PATCHED]
