"""Export a trained model as a Hugging Face ``LlavaForConditionalGeneration`` folder.

The folder holds config.json, model.safetensors, the tokenizer (with ``<image>``), the image
processor and a ``LlavaProcessor``, so that ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load it in transformers, vLLM and lmms-eval unchanged. The
parameter names are those of ``LlavaForConditionalGeneration``: barnfast's fused projector keeps
``linear_1``/``linear_2``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .model import IMAGE_TOKEN, LlavaVLM


BARNFAST_META = "barnfast.json"


def export_hf(model: LlavaVLM, tokenizer, dest: str | Path, dtype: torch.dtype | None = None,
              meta: dict | None = None) -> Path:
    """Write the Hugging Face folder; ``dtype`` casts the saved weights (default: as trained).

    ``meta`` (backbone name, chat template, vision tower, image aspect, ...) is written to
    ``barnfast.json`` beside the weights, so evaluation and generation prompt the model the way it
    was trained.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hf = model.hf
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in hf.state_dict().items()}
    hf.save_pretrained(dest, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    image_processor = model.vision.image_processor()
    image_processor.save_pretrained(dest)
    try:
        from transformers import LlavaProcessor

        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=model.vision.patch_size,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy, image_token=IMAGE_TOKEN,
            num_additional_image_tokens=1 if model.vision.drop_cls else 0,
        )
        processor.save_pretrained(dest)
    except Exception as exc:  # noqa: BLE001 - the model folder is complete without it; say why it is missing
        warnings.warn(f"LlavaProcessor not saved ({type(exc).__name__}: {exc}); model, tokenizer and image "
                      f"processor are", stacklevel=2)
    info = {"image_token": IMAGE_TOKEN, "image_token_id": model.image_token_id, "vision": model.vision.name,
            "num_image_tokens": model.vision.num_tokens, **(meta or {})}
    (dest / BARNFAST_META).write_text(json.dumps(info, indent=2))
    return dest


def read_meta(folder: str | Path) -> dict:
    """The ``barnfast.json`` of an exported folder (empty dict for a folder barnfast did not write)."""
    path = Path(folder) / BARNFAST_META
    return json.loads(path.read_text()) if path.exists() else {}
