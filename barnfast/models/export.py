"""Export a trained model as a Hugging Face ``LlavaForConditionalGeneration`` folder, or in barnfast's format.

The folder holds config.json, model.safetensors, the tokenizer (with ``<image>``), the image
processor and a ``LlavaProcessor``, so that ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load it in transformers, vLLM and lmms-eval unchanged. The
parameter names are those of ``LlavaForConditionalGeneration``: barnfast's fused projector keeps
``linear_1``/``linear_2``; the ``linear`` projector is written as ``linear_1`` = W, activation
``linear`` (identity), ``linear_2`` = I, which computes exactly ``W x + b``.

What ``LlavaForConditionalGeneration`` cannot compute is exported in **barnfast's format**
(:func:`llava_incompatibility` says why), loaded back with :func:`load_barnfast`:

- the ``perceiver`` projector (no such module in Llava);
- S2 with more than one scale (Llava runs the tower once on the image, no tiles or pooling);
- a tower with more than one prefix token to drop (DINOv2 with registers: Llava's ``default``
  strategy drops only the first token, and would feed the 4 registers to the projector).

barnfast's format (``barnfast.json`` says ``"format": "barnfast"``): ``llm/`` (the decoder as a
Hugging Face ``*ForCausalLM`` folder with the tokenizer, ``<image>`` included), ``vision_tower/``
(the tower's ``save_pretrained``), ``projector.safetensors`` (the projector's state dict), the image
processor, and in ``barnfast.json`` the projector kind and sizes, the S2 scales and the tower name.
There is no ``config.json`` at the top, so transformers refuses the folder instead of loading it
with a random projector.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from barnfast.models.projectors import LinearProjector, projector_kind
from barnfast.models.vlm import IMAGE_TOKEN, LlavaVLM

BARNFAST_META = "barnfast.json"


def export_hf(model: LlavaVLM, tokenizer, dest: str | Path, dtype: torch.dtype | None = None,
              meta: dict | None = None) -> Path:
    """Write the Hugging Face folder; ``dtype`` casts the saved weights (default: as trained).

    ``meta`` (backbone name, chat template, vision tower, image aspect, ...) is written to
    ``barnfast.json`` beside the weights, so evaluation and generation prompt the model the way it
    was trained. A model that ``LlavaForConditionalGeneration`` cannot run (perceiver, S2, DINOv2
    with registers) is written in barnfast's format instead, with a warning (see the module docstring).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    why = llava_incompatibility(model)
    if why is not None:
        warnings.warn(f"exporting in barnfast's format (load with barnfast.models.export.load_barnfast), not as "
                      f"LlavaForConditionalGeneration: {why}", stacklevel=2)
        return export_barnfast(model, tokenizer, dest, dtype=dtype, meta={**(meta or {}), "why_not_llava": why})
    hf = model.hf
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in hf.state_dict().items()}
    if isinstance(model.projector, LinearProjector):  # as a LlavaMultiModalProjector with act "linear"
        prefix = "model.multi_modal_projector."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state |= {k: (v.to(dtype) if dtype is not None else v).detach().cpu()
                  for k, v in model.projector.llava_state_dict(prefix).items()}
    hf.save_pretrained(dest, state_dict=state, safe_serialization=True)
    jinja = hf_chat_template((meta or {}).get("chat_template", "plain"), (meta or {}).get("system_prompt"))
    if jinja is not None:  # so that tokenizer.apply_chat_template gives the ids barnfast trained on
        tokenizer.chat_template = jinja
    tokenizer.save_pretrained(dest)
    image_processor = model.vision.image_processor()
    image_processor.save_pretrained(dest)
    try:
        from transformers import LlavaProcessor

        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=model.vision.patch_size,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy, image_token=IMAGE_TOKEN,
            num_additional_image_tokens=1 if model.vision.drop_cls else 0, chat_template=jinja,
        )
        processor.save_pretrained(dest)
    except Exception as exc:  # noqa: BLE001 - the model folder is complete without it; say why it is missing
        warnings.warn(f"LlavaProcessor not saved ({type(exc).__name__}: {exc}); model, tokenizer and image "
                      f"processor are", stacklevel=2)
    (dest / BARNFAST_META).write_text(json.dumps(_meta(model, "llava", meta), indent=2))
    return dest


# -- chat templates for transformers' apply_chat_template ---------------------------------------------------
# Jinja versions of barnfast.data.chat's templates: tokenizer.apply_chat_template(messages,
# add_generation_prompt=True) gives the ids barnfast trained on (each image as one <image> token; a
# LlavaProcessor expands it to the tower's slots). Message content may be a string or transformers' list of
# {"type": "image"} / {"type": "text", "text": ...} parts; an image part renders as "<image>\n", LLaVA's
# placement, which is also where barnfast's evaluation puts it.
# IMAGE_TEXT is "<image>\n" for byte-level vocabularies and "<image> \n" for the Metaspace ones: barnfast, as
# LLaVA's tokenizer_image_token, tokenizes the text after an image as a fresh call, which opens it with "▁".
_JINJA_CONTENT = (
    "{%- macro content(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for part in c -%}"
    "{%- if part['type'] == 'image' -%}{{ IMAGE_TEXT }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
_METASPACE_TEMPLATES = ("vicuna_v1", "llama_2", "mistral")
_JINJA_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = content(messages[0]['content']) -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = DEFAULT_SYSTEM -%}{%- set turns = messages -%}"
    "{%- endif -%}"
)
# The Metaspace (sentencepiece-layout) tokenizers prefix the first word of a text with "▁"; barnfast
# tokenizes the text after the leading BOS as the start of a text, while transformers tokenizes the rendered
# string whole (where nothing follows a special token with "▁"), so these templates put one space after BOS.
_JINJA_BODY = {
    "vicuna_v1": (
        "{{ bos_token }}{{ ' ' }}{%- if system -%}{{ system + ' ' }}{%- endif -%}"
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{{ 'USER: ' + content(m['content']) + ' ASSISTANT:' }}"
        "{%- else -%}{{ ' ' + content(m['content']) + eos_token }}{%- endif -%}{%- endfor -%}"
    ),
    "llama_2": (
        "{{ bos_token }}{{ ' ' }}{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
        "{%- if not loop.first -%}{{ bos_token }}{%- endif -%}{{ '[INST] ' }}"
        "{%- if loop.first and system -%}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{%- endif -%}"
        "{{ content(m['content']) + ' [/INST]' }}{%- else -%}{{ ' ' + content(m['content']) + ' ' + eos_token }}"
        "{%- endif -%}{%- endfor -%}"
    ),
    "mistral": (
        "{{ bos_token }}{{ ' ' }}{%- for m in turns -%}{%- if m['role'] == 'user' -%}{{ '[INST] ' }}"
        "{%- if loop.first and system -%}{{ system + '\n\n' }}{%- endif -%}{{ content(m['content']) + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + content(m['content']) + eos_token }}{%- endif -%}{%- endfor -%}"
    ),
    "llama_3": (
        "{{ bos_token }}{%- if system -%}{{ '<|start_header_id|>system<|end_header_id|>\n\n' + system | trim"
        " + '<|eot_id|>' }}{%- endif -%}{%- for m in turns -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + content(m['content']) | trim"
        " + '<|eot_id|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
    ),
    "llama_3_1": (
        "{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\n\n' + LLAMA_3_1_HEADER + (system or '') | trim"
        " + '<|eot_id|>' }}{%- for m in turns -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + content(m['content']) | trim"
        " + '<|eot_id|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
    ),
    "chatml": (
        "{%- if system -%}{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}{%- endif -%}"
        "{%- for m in turns -%}{{ '<|im_start|>' + m['role'] + '\n' + content(m['content']) + '<|im_end|>\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
}


def hf_chat_template(template: str, system: str | None = None) -> str | None:
    """The Jinja chat template (transformers' ``chat_template``) of barnfast's template ``template``, whose
    system text when the messages bring none is ``system`` (None: the template's own; ``""``: none, as a run
    with ``train.system_prompt = ""`` trained); None for ``plain`` (stage 1's caption format is not a chat)."""
    from barnfast.data.chat import TEMPLATES

    if template == "plain":
        return None
    if template not in _JINJA_BODY:
        raise ValueError(f"no transformers chat template for {template!r}; known: {', '.join(_JINJA_BODY)}")
    default = TEMPLATES[template].default_system if system is None else system
    from barnfast.data.chat import LLAMA_3_1_SYSTEM_HEADER

    image_text = "<image> \n" if template in _METASPACE_TEMPLATES else "<image>\n"
    return ("{%- set IMAGE_TEXT = " + json.dumps(image_text) + " -%}"
            + "{%- set LLAMA_3_1_HEADER = " + json.dumps(LLAMA_3_1_SYSTEM_HEADER) + " -%}" + _JINJA_CONTENT
            + "{%- set DEFAULT_SYSTEM = " + json.dumps(default) + " -%}" + _JINJA_SYSTEM + _JINJA_BODY[template])


def _meta(model: LlavaVLM, fmt: str, meta: dict | None) -> dict:
    return {"format": fmt, "image_token": IMAGE_TOKEN, "image_token_id": model.image_token_id,
            "vision": model.vision.name, "num_image_tokens": model.visual_tokens_per_image,
            "projector": projector_kind(model.projector), "s2_scales": list(model.s2_scales), **(meta or {})}


def llava_incompatibility(model: LlavaVLM) -> str | None:
    """Why ``LlavaForConditionalGeneration`` cannot compute this model, or None when it can."""
    if projector_kind(model.projector) == "perceiver":
        return "the perceiver projector has no LlavaForConditionalGeneration counterpart"
    if len(model.s2_scales) > 1:
        return f"S2 scales {list(model.s2_scales)}: Llava encodes the image once, without tiles and pooling"
    if model.vision.drop_cls and model.vision.num_prefix_tokens > 1:
        return (f"{model.vision.name} has {model.vision.num_prefix_tokens} prefix tokens (CLS + registers) to drop; "
                f"Llava's 'default' strategy drops only the first")
    return None


def export_barnfast(model: LlavaVLM, tokenizer, dest: str | Path, dtype: torch.dtype | None = None,
                    meta: dict | None = None) -> Path:
    """Write barnfast's format (module docstring) to ``dest``; :func:`load_barnfast` reads it back."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cast = lambda v: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()  # noqa: E731
    text_config = model.hf.config.text_config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    lm.model, lm.lm_head = model.language_model, model.lm_head  # the trained modules, not copies
    lm.save_pretrained(dest / "llm", state_dict={k: cast(v).contiguous() for k, v in lm.state_dict().items()},
                       safe_serialization=True)
    jinja = hf_chat_template((meta or {}).get("chat_template", "plain"), (meta or {}).get("system_prompt"))
    if jinja is not None:
        tokenizer.chat_template = jinja
    tokenizer.save_pretrained(dest / "llm")
    tower = model.vision_tower
    tower.save_pretrained(dest / "vision_tower", state_dict={k: cast(v).contiguous()
                                                             for k, v in tower.state_dict().items()})
    save_file({k: cast(v).contiguous() for k, v in model.projector.state_dict().items()},
              str(dest / "projector.safetensors"))
    tokenizer.save_pretrained(dest)
    model.vision.image_processor().save_pretrained(dest)
    proj = model.projector
    sizes = {"projector_in": proj.linear_1.in_features, "projector_approximate": getattr(proj, "approximate", "none"),
             "perceiver_latents": getattr(proj, "num_latents", None), "perceiver_depth": getattr(proj, "depth", None)}
    (dest / BARNFAST_META).write_text(json.dumps({**_meta(model, "barnfast", meta), **sizes}, indent=2))
    return dest


class _SavedLLM:
    """The ``llm/`` folder of barnfast's format, in the shape of a backbone entry for ``build_model``."""

    def load_tokenizer(self, model_path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)

    def load_model(self, model_path, *, dtype=torch.float32, seed=0):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=dtype)


def load_barnfast(folder: str | Path, *, dtype: torch.dtype = torch.float32, kernel_backend: str = "auto"):
    """(LlavaVLM, tokenizer) of a folder in barnfast's format (:func:`export_barnfast`)."""
    from safetensors.torch import load_file

    from barnfast.models import vision as vision_registry
    from barnfast.models.vlm import build_model

    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("format") != "barnfast":
        raise ValueError(f"{folder} is not in barnfast's format (no barnfast.json with format 'barnfast'); "
                         f"a Llava folder loads with LlavaForConditionalGeneration.from_pretrained")
    model, tok = build_model(
        _SavedLLM(), vision_registry.from_name(meta["vision"]), model_path=str(folder / "llm"),
        vision_path=str(folder / "vision_tower"), dtype=dtype, pad_vocab_to_multiple_of=1,
        kernel_backend=kernel_backend, projector=meta["projector"], s2_scales=meta["s2_scales"],
        projector_approximate=meta["projector_approximate"], perceiver_latents=meta["perceiver_latents"] or 64,
        perceiver_depth=meta["perceiver_depth"] or 3)
    state = load_file(str(folder / "projector.safetensors"))
    model.projector.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model, tok


def read_meta(folder: str | Path) -> dict:
    """The ``barnfast.json`` of an exported folder (empty dict for a folder barnfast did not write)."""
    path = Path(folder) / BARNFAST_META
    return json.loads(path.read_text()) if path.exists() else {}
