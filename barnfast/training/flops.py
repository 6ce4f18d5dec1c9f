"""FLOPs of a training step and model FLOPs utilisation (MFU).

Counted as multiply-adds × 2, dense, no recomputation (activation checkpointing is not counted:
MFU measures useful work). For a step over samples of token lengths ``L_i`` (visual tokens
included) with ``I`` images:

- decoder, trainable (stage 2):   6 · N_dec · ΣL_i  +  attention  6 · n_layers · d · ΣL_i²
  (N_dec: parameters of the decoder's linear layers, lm_head included, embeddings excluded;
  forward 2·N per token and backward 4·N; causal attention does QKᵀ and AV over half the
  L×L square: forward 2·2·d·L²/2 per layer, ×3 with backward)
- decoder, frozen (stage 1): the backward still computes input gradients, not weight gradients:
  4 · N_dec · ΣL_i + attention 6 · n_layers · d · ΣL_i² (the attention backward has no weights)
- projector: 6 · N_proj · I · (tower tokens per image): exact for the MLP and linear projectors; for the
  perceiver resampler a lower bound (its latent self-attention is not counted)
- vision tower, frozen, forward only, per encoded tile (one per image, Σ s² with S2 scales s):
  2 · N_vis · (patches + prefix) + attention 4 · n_vis_layers · d_vis · (patches + prefix)²;
  zero when the features come from the vision-feature cache (nothing is computed)

MFU = step FLOPs / (step time × peak dense bf16 FLOP/s of one device × devices).
"""

from __future__ import annotations

import torch

# Dense bf16 peak, FLOP/s, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


class FlopCounter:
    """Per-model constants, computed once; :meth:`step` evaluates the formulas above."""

    def __init__(self, model) -> None:
        lm = model.language_model
        cfg = lm.config
        self.n_dec = _linear_params(lm) + model.lm_head.weight.numel()
        self.layers = cfg.num_hidden_layers
        self.d = cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) \
            else cfg.hidden_size
        self.n_proj = sum(p.numel() for p in model.projector.parameters())
        vcfg = model.vision_tower.config
        self.n_vis = _linear_params(model.vision_tower)
        self.vis_layers = vcfg.num_hidden_layers
        self.vis_d = vcfg.hidden_size
        prefix = getattr(model.vision, "num_prefix_tokens", int(model.vision.drop_cls))  # CLS (+ registers)
        self.vis_tokens = model.vision.num_tokens + prefix
        self.tiles_per_image = sum(s * s for s in getattr(model, "s2_scales", (1,)))
        self.tower_tokens_per_image = model.vision.num_tokens

    def step(self, sum_len: float, sum_len_sq: float, num_images: float, train_llm: bool,
             vision_computed: bool = True) -> float:
        dec = (6 if train_llm else 4) * self.n_dec * sum_len + 6 * self.layers * self.d * sum_len_sq
        proj = 6 * self.n_proj * num_images * self.tower_tokens_per_image
        per_tile = 2 * self.n_vis * self.vis_tokens + 4 * self.vis_layers * self.vis_d * self.vis_tokens ** 2
        vis = num_images * self.tiles_per_image * per_tile if vision_computed else 0.0
        return dec + proj + vis
