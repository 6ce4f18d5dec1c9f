"""barnfast's kernels in a plain Hugging Face ``Trainer`` run, offline, on a CPU, in about a minute.

    python examples/hf_trainer.py            # from the repository root

A tiny ``LlavaForConditionalGeneration`` is built from barnfast's registry configs (llama1-tiny text model,
clip-tiny vision tower, random weights, no download); barnfast's synthetic set gives 12 captioned images.
Two copies of the same model train 3 optimizer steps (2 micro-batches of 2 samples each) with the
``Trainer``: one unpatched, one after :func:`barnfast.patch.apply_barnfast_kernels`. The patched copy never
builds the (B, T, 32064) logits, yet its logged losses must equal the unpatched ones (the Trainer rounds them
to 4 significant digits; the check allows 1e-3 relative), else the script exits with status 1.
For a real model replace :func:`tiny_llava` by
``LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype="bfloat16")``.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, Trainer, TrainingArguments

from barnfast.data import synthetic
from barnfast.data.chat import encode_conversation
from barnfast.models import backbones, vision
from barnfast.patch import apply_barnfast_kernels

BACKBONE = backbones.from_name("llama1-tiny")
TOWER = vision.from_name("clip-tiny")
IMAGE_TOKEN = 32000  # llama1's 32000 tokens, then <image>; the vocabulary padded to 32064 as llava-hf's is
VOCAB = 32064


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    text_config = BACKBONE.text_config()
    text_config.vocab_size = VOCAB
    config = LlavaConfig(
        vision_config=TOWER.vision_config(),
        text_config=text_config,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=TOWER.feature_layer,
        vision_feature_select_strategy="default" if TOWER.drop_cls else "full",
        image_seq_length=TOWER.num_tokens,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).float()


def synthetic_dataset(root: str | Path, n: int = 12) -> list[dict]:
    """n captioned images of barnfast's synthetic set as (input_ids, labels, pixel_values) items."""
    root = Path(root)
    synthetic.generate(root, num_stage1=n, num_stage2=0, num_eval=0, image_size=TOWER.image_size, seed=0,
                       progress=False)
    tokenizer = BACKBONE.load_tokenizer()
    items = []
    for rec in json.loads((root / "stage1.json").read_text()):
        ids, labels = encode_conversation(tokenizer, "plain", rec["conversations"], image_token_id=IMAGE_TOKEN,
                                          num_image_tokens=TOWER.num_tokens)
        with Image.open(root / rec["image"]) as img:
            pixels = TOWER.preprocess(img.convert("RGB"))
        items.append(dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), pixel_values=pixels))
    return items


def collate(items: list[dict]) -> dict:
    """Right-padded batch: input_ids/labels/attention_mask (B, T), pixel_values (B, 3, S, S)."""
    T = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
    return dict(input_ids=ids, labels=labels, attention_mask=mask,
                pixel_values=torch.stack([x["pixel_values"] for x in items]))


def train(model, data, output_dir: str | Path, steps: int = 3) -> list[float]:
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp) / "data")
        reference = tiny_llava()
        model = copy.deepcopy(reference)
        applied = apply_barnfast_kernels(model)  # before the Trainer wraps the model
        losses = train(model, data, Path(tmp) / "patched")
        ref_losses = train(reference, data, Path(tmp) / "unpatched")
    print(f"patched with {applied}")
    print(f"losses patched   {losses}")
    print(f"losses unpatched {ref_losses}")
    same = len(losses) == len(ref_losses) == 3 and all(
        abs(a - b) <= 1e-3 * abs(b) for a, b in zip(losses, ref_losses))
    print("same losses" if same else "LOSSES DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
