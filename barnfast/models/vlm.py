"""The LLaVA model: Hugging Face modules, barnfast's forward.

The modules are those of a transformers ``LlavaForConditionalGeneration`` (vision tower, projector,
language model, ``lm_head``), with the same parameter names, so the trained model is exported with
``save_pretrained`` and loads in transformers, vLLM and lmms-eval unchanged. The projector is
barnfast's fused :class:`~barnfast.kernels.ProjectorMLP` (same ``linear_1``/``linear_2`` names).

The train step never calls Hugging Face's forward. :meth:`LlavaVLM.forward` runs, on one packed
micro-batch:

    pixel_values (I,3,S,S) ─ vision tower (frozen, layer -2, CLS dropped) ─► (I,P,C)
      └─ projector_mlp ─► visual (I·P, H)
    merge_visual_text(input_ids, embed_tokens.weight, visual) ─► embeddings (T, H)
      └─ decoder layers, attention isolated per sample (cu_seqlens) ─► norm ─► (T, H)
        └─ fused_linear_cross_entropy(hidden, lm_head.weight, targets, num_target_tokens)

so the (T, V) logits never exist. :meth:`LlavaVLM.forward_padded` is the LLaVA-recipe baseline
(per-sample merge loop, padded batch, full logits), kept for comparison and tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlavaConfig, LlavaForConditionalGeneration

from barnfast.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch
from barnfast.kernels import fused_linear_cross_entropy, merge_visual_text
from barnfast.models import attention
from barnfast.models.liger import apply_liger_to_decoder
from barnfast.models.projectors import build_projector, output_tokens
from barnfast.models.s2 import check_scales, encode_multiscale
from barnfast.models.vision import VisionTower

IMAGE_TOKEN = "<image>"


class LlavaVLM(nn.Module):
    """A ``LlavaForConditionalGeneration`` (``self.hf``) with barnfast's packed training forward."""

    def __init__(self, hf: LlavaForConditionalGeneration, vision: VisionTower, image_token_id: int,
                 kernel_backend: str = "auto"):
        super().__init__()
        self.hf = hf
        self.vision = vision
        self.image_token_id = int(image_token_id)
        self.kernel_backend = kernel_backend

    # The modules, by their Hugging Face names.
    @property
    def vision_tower(self) -> nn.Module:
        return self.hf.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.hf.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.hf.model.language_model

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf.lm_head

    def set_trainable(self, *, projector: bool, llm: bool) -> None:
        """Stage 1: projector only; stage 2: projector + LLM. The vision tower is always frozen."""
        self.vision_tower.requires_grad_(False)
        self.projector.requires_grad_(projector)
        self.language_model.requires_grad_(llm)
        self.lm_head.requires_grad_(llm)

    # S2 scales and the projector's token count; build_model sets them (defaults: the plain LLaVA path).
    s2_scales: tuple[int, ...] = (1,)

    @property
    def visual_tokens_per_image(self) -> int:
        """``<image>`` slots per image: the projector's output count (perceiver: its latents; else the tower's).

        The one source of truth for the dataset's ``<image>`` expansion and the exported metadata."""
        return output_tokens(self.projector, self.vision.num_tokens)

    def visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen tower (with S2 when ``s2_scales`` has more than 1): (I, 3, s·S, s·S) → (I, P, C·len(scales))."""
        with torch.no_grad():
            return encode_multiscale(self.vision, self.vision_tower, pixel_values.to(self.vision_tower.dtype),
                                     self.s2_scales)

    def visual_tokens(self, pixel_values: torch.Tensor | None, features: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """(I, 3, S, S) images, or their cached tower ``features`` (I, P, C) → (I·N, H) projected visual
        tokens, in image order. Given ``features``, the tower does not run."""
        proj_dtype = self.projector.linear_1.weight.dtype
        if features is None and pixel_values is not None and pixel_values.shape[0]:
            features = self.visual_features(pixel_values)
        if features is None or features.shape[0] == 0:
            H = self.language_model.config.hidden_size
            return self.projector.linear_1.weight.new_zeros(0, H)
        out = self.projector(features.to(proj_dtype))  # (I, N, H)
        return out.reshape(-1, out.shape[-1])

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm hidden states (T, H) of a packed micro-batch."""
        lm = self.language_model
        visual = self.visual_tokens(batch.pixel_values, getattr(batch, "visual_features", None))
        # The collator counted the placeholders on the host: the merge checks them against the projector's
        # rows without an .item() (None: it counts them itself, one sync).
        embeds = merge_visual_text(batch.input_ids, lm.embed_tokens.weight, visual.to(lm.embed_tokens.weight.dtype),
                                   self.image_token_id, backend=self.kernel_backend,
                                   num_image_tokens=getattr(batch, "num_image_tokens", None))
        x = embeds.unsqueeze(0)  # (1, T, H): one packed row
        pos = batch.position_ids.unsqueeze(0)
        rope = lm.rotary_emb(x, pos)
        kwargs = attention.packing_kwargs(batch.cu_seqlens, batch.max_seqlen, x.shape[1],
                                          getattr(batch, "cu_seqlens_host", None) or None)
        for layer in lm.layers:
            x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope, **kwargs)
        return lm.norm(x)[0]

    def forward(self, batch: PackedBatch | PaddedBatch, num_target_tokens: torch.Tensor | float | None = None
                ) -> torch.Tensor:
        """Loss of a micro-batch: sum of its token losses / ``num_target_tokens`` (default: its own count).

        A :class:`PaddedBatch` goes through the LLaVA-recipe baseline :meth:`forward_padded`.
        """
        if isinstance(batch, PaddedBatch):
            return self.forward_padded(batch, num_target_tokens)
        hidden = self.hidden_states(batch)
        # target_rows: the rows with a loss term, found on the host by the collator (no nonzero() sync)
        loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, batch.targets, reduction="mean",
                                          num_target_tokens=num_target_tokens, backend=self.kernel_backend,
                                          target_rows=getattr(batch, "target_rows", None))
        if batch.num_images == 0 and self.projector.linear_1.weight.requires_grad:
            # A micro-batch with no image still gives the projector a (zero) gradient, so every
            # rank reduces the same parameters.
            loss = loss + 0.0 * sum(p.sum() for p in self.projector.parameters())
        return loss

    @torch.no_grad()
    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """(T, V) logits of a packed micro-batch (tests and evaluation; training never builds them)."""
        return self.hidden_states(batch) @ self.lm_head.weight.T

    # -- the LLaVA-recipe baseline -------------------------------------------------------------
    def forward_padded(self, batch: PaddedBatch, num_target_tokens: torch.Tensor | float | None = None
                       ) -> torch.Tensor:
        """The original LLaVA way: per-sample merge loop, padded batch, full logits, plain cross-entropy."""
        lm = self.language_model
        embed = lm.embed_tokens
        visual = self.visual_tokens(batch.pixel_values)
        rows, k = [], 0
        for b in range(batch.input_ids.shape[0]):  # split at image tokens, embed text pieces, splice images
            ids = batch.input_ids[b]
            is_img = ids == self.image_token_id
            row = embed(ids.masked_fill(is_img, 0))
            n = int(is_img.sum())
            if n:
                row = row.clone()
                row[is_img] = visual[k:k + n].to(row.dtype)
                k += n
            rows.append(row)
        x = torch.stack(rows)
        out = lm(inputs_embeds=x, attention_mask=batch.attention_mask)
        logits = self.lm_head(out.last_hidden_state).float()
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.targets.view(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        denom = batch.num_targets.clamp(min=1) if num_target_tokens is None else num_target_tokens
        if batch.pixel_values is None and self.projector.linear_1.weight.requires_grad:
            loss = loss + 0.0 * sum(p.sum() for p in self.projector.parameters())
        return loss / denom


def _resize_vocab(lm: nn.Module, new_size: int) -> None:
    """Grow the LLM's embedding and output rows to ``new_size``; new rows = mean of the old (deterministic)."""
    old = lm.get_input_embeddings().weight.shape[0]
    if new_size == old:
        return
    lm.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0, keepdim=True)
        out = lm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old:] = out.weight[:old].mean(0, keepdim=True)


def add_image_token(tokenizer) -> int:
    """Append ``<image>`` as a special token (once) and return its id."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_model(backbone, vision: VisionTower, *, model_path: str | None = None, vision_path: str | None = None,
                seed: int = 0, dtype: torch.dtype = torch.float32, projector_approximate: str = "none",
                pad_vocab_to_multiple_of: int = 64, kernel_backend: str = "auto", projector: str = "mlp2x_gelu",
                perceiver_latents: int = 64, perceiver_depth: int = 3, s2_scales=(1,)):
    """Assemble (LlavaVLM, tokenizer) from a backbone and a vision tower registry entry.

    The tokenizer gets an ``<image>`` token appended (id = its old length); the LLM's embeddings
    and ``lm_head`` grow to cover it, rounded up to ``pad_vocab_to_multiple_of`` as the llava-hf
    checkpoints do (32000 → 32064). The projector (``projector``: ``mlp2x_gelu`` | ``linear`` |
    ``perceiver``, see :mod:`barnfast.models.projectors`) maps ``vision.hidden_size * len(s2_scales)``
    channels to the LLM's width and is initialised from ``seed + 1``.
    """
    s2_scales = check_scales(s2_scales)
    tokenizer = backbone.load_tokenizer(model_path)
    image_token_id = add_image_token(tokenizer)
    lm = backbone.load_model(model_path, dtype=dtype, seed=seed)
    vocab = max(len(tokenizer), lm.get_input_embeddings().weight.shape[0])
    m = pad_vocab_to_multiple_of
    _resize_vocab(lm, (vocab + m - 1) // m * m)
    tower = vision.load(vision_path, dtype=dtype, seed=seed)
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=lm.config,
        image_token_id=image_token_id,
        # A linear projector exports as linear_1, identity activation, linear_2 = I (barnfast.models.projectors).
        projector_hidden_act="linear" if projector == "linear" else (
            "gelu" if projector_approximate == "none" else "gelu_pytorch_tanh"),
        vision_feature_layer=vision.feature_layer,
        vision_feature_select_strategy="default" if vision.drop_cls else "full",
        image_seq_length=vision.num_tokens,
        multimodal_projector_bias=True,
    )
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower = tower
    hf.model.language_model = lm.model
    hf.lm_head = lm.lm_head
    # After LlavaForConditionalGeneration's construction, which resets its text config's attention
    # implementation (that config object is shared with the decoder layers).
    lm.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    if lm.model.layers[0].self_attn.config._attn_implementation != attention.ATTN_IMPLEMENTATION:
        raise RuntimeError("packed attention was not installed in the decoder layers")
    apply_liger_to_decoder(lm.model)  # CUDA only: Liger's RMSNorm/RoPE/SwiGLU into these instances; logs why not
    H = lm.config.hidden_size
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed + 1)
        hf.model.multi_modal_projector = build_projector(
            projector, vision.hidden_size * len(s2_scales), H, approximate=projector_approximate,
            perceiver_latents=perceiver_latents, perceiver_depth=perceiver_depth, backend=kernel_backend).to(dtype)
    vlm = LlavaVLM(hf, vision, image_token_id, kernel_backend=kernel_backend)
    vlm.s2_scales = s2_scales
    config.image_seq_length = vlm.visual_tokens_per_image
    return vlm, tokenizer
