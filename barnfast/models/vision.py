"""Vision-tower registry: which encoder, its preprocessing, and how its patch features are taken.

A tower is frozen and read LLaVA-1.5's way: ``hidden_states[feature_layer]`` (-2, the
penultimate layer's output) with the prefix tokens dropped (CLIP: CLS; DINOv2: CLS; DINOv2 with
registers: CLS + 4 registers; SigLIP has none), i.e. for CLIP what transformers'
``LlavaModel.get_image_features`` selects with ``vision_feature_layer=-2`` and
``vision_feature_select_strategy="default"``.

| name | family (transformers class) | input | patch | tokens | width | prefix dropped |
| --- | --- | --- | --- | --- | --- | --- |
| ``clip-l-336`` (default) | ``CLIPVisionModel`` | 336 | 14 | 576 | 1024 | CLS |
| ``siglip-so400m-384`` | ``SiglipVisionModel`` | 384 | 14 | 729 | 1152 | — |
| ``siglip2`` (``google/siglip2-so400m-patch14-384``) | ``SiglipVisionModel`` | 384 | 14 | 729 | 1152 | — |
| ``dinov2-l`` | ``Dinov2Model`` | 336 (pos. emb. of 518, interpolated) | 14 | 576 | 1024 | CLS |
| ``dinov2-l-reg`` | ``Dinov2WithRegistersModel`` | 336 (of 518) | 14 | 576 | 1024 | CLS + 4 reg. |

SigLIP2: the fixed-resolution checkpoints (``google/siglip2-*-patch14-384``) are SigLIP
architectures (their config says ``model_type: siglip``); ``Siglip2VisionModel`` is the NaFlex
variant (patchified input, ``spatial_shapes``), which LLaVA-MORE does not use. DINOv2 runs at 336
as in LLaVA-MORE, so it gives CLIP's 576 tokens and the same token budget; its 518-pixel position
embeddings are interpolated by transformers (``native_image_size``). Mean/std: CLIP's, SigLIP's
0.5, ImageNet's for DINOv2.

Every real tower has a ``-tiny`` twin of the same family, preprocessing, feature layer and prefix
convention with random weights (deterministic from a seed), so the pipeline runs offline.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch

from barnfast.data.images import ImageSpec, preprocess_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2
IMAGENET_STD = (0.229, 0.224, 0.225)

ALLOW_DOWNLOAD_ENV = "BARNFAST_ALLOW_DOWNLOAD"


def _family_classes(family: str) -> tuple[type, type, type]:
    """(config class, model class, image processor class) of a family, imported lazily."""
    if family == "clip":
        import transformers

        # transformers 5 ships a PIL image processor; CLIPImageProcessor itself wants torchvision
        # and only falls back (with a warning) without it. The saved config names
        # "CLIPImageProcessor" either way.
        processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return transformers.CLIPVisionConfig, transformers.CLIPVisionModel, processor
    if family == "siglip":
        import transformers

        return transformers.SiglipVisionConfig, transformers.SiglipVisionModel, _clip_processor_cls()
    if family == "dinov2":
        import transformers

        return transformers.Dinov2Config, transformers.Dinov2Model, _clip_processor_cls()
    if family == "dinov2-reg":
        import transformers

        return transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel, _clip_processor_cls()
    raise ValueError(f"unknown vision family {family!r}; known: {', '.join(FAMILIES)}")


FAMILIES = ("clip", "siglip", "dinov2", "dinov2-reg")


def _clip_processor_cls() -> type:
    # Every family is saved with the same resize-shortest-side + centre-crop processor, equal to
    # ``preprocess(mode="resize")``: SigLIP's own processor squashes to a square and DINOv2's (Bit)
    # crops 224, which would make the exported model see other pixels than it was trained on.
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


@dataclass(frozen=True)
class VisionTower:
    """A named vision encoder and its preprocessing.

    Real towers load from a local folder (or the hub when ``BARNFAST_ALLOW_DOWNLOAD=1``); tiny
    towers are random-init from ``vision_config()`` and need no files.
    """

    name: str
    family: str  # decides the transformers classes: one of FAMILIES
    hf_id: str | None  # hub id of the real weights; None for tiny towers
    image_size: int  # S of the (3, S, S) input
    patch_size: int
    hidden_size: int  # width of each visual token
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_layer: int  # index into hidden_states (0 = embeddings); -2 = penultimate layer
    drop_cls: bool  # drop the prefix tokens (CLS, and registers) of the selected layer
    tiny: bool
    tiny_twin: str  # name of the offline twin (itself for a tiny tower)
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"  # OpenAI CLIP's activation
    num_prefix_tokens: int = 1  # tokens before the patches: CLIP/DINOv2 1 (CLS), DINOv2-reg 5, SigLIP 0
    native_image_size: int | None = None  # the checkpoint config's image_size when it differs (DINOv2: 518)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.num_prefix_tokens < 0 or (self.drop_cls and self.num_prefix_tokens == 0):
            raise ValueError(f"{self.name}: drop_cls needs num_prefix_tokens >= 1, got {self.num_prefix_tokens}")
        # Not a multiple in general: SigLIP so400m/14 at 384 gives 27 patches a side (the conv floors).
        if self.image_size < self.patch_size:
            raise ValueError(f"{self.name}: image_size {self.image_size} smaller than patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{self.name}: hidden_size {self.hidden_size} not a multiple of num_heads {self.num_heads}"
            )
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise ValueError(
                f"{self.name}: feature_layer {self.feature_layer} outside hidden_states of {self.num_layers} layers"
            )

    @property
    def grid(self) -> int:
        """Patches per side: ``image_size // patch_size`` (24 for CLIP-L/336)."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image after the prefix drop: ``grid ** 2`` (576 for CLIP-L/336, 729 for SigLIP/384)."""
        return self.grid ** 2 + (0 if self.drop_cls else self.num_prefix_tokens)

    def vision_config(self) -> Any:
        """The transformers vision config of this architecture (e.g. ``CLIPVisionConfig``)."""
        config_cls, _, _ = _family_classes(self.family)
        common = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads, image_size=self.native_image_size or self.image_size,
                      patch_size=self.patch_size, hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps)
        if self.family in ("dinov2", "dinov2-reg"):
            extra = {"num_register_tokens": self.num_prefix_tokens - 1} if self.family == "dinov2-reg" else {}
            return config_cls(**common, mlp_ratio=self.intermediate_size // self.hidden_size, **extra)
        return config_cls(**common, intermediate_size=self.intermediate_size)

    def load(self, model_path: str | None = None, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
        """The frozen model in eval mode (every parameter ``requires_grad=False``).

        ``model_path``: a local folder with the weights (a full CLIP checkpoint works too); it
        wins over everything. Otherwise a tiny tower is random-initialised from ``seed`` (same seed →
        same weights; the global RNG is left untouched) and a real tower is fetched from the hub only
        when ``BARNFAST_ALLOW_DOWNLOAD=1``; else ``RuntimeError`` naming ``--vision-path`` and the tiny twin.
        """
        _, model_cls, _ = _family_classes(self.family)
        if model_path is not None:
            model = model_cls.from_pretrained(str(model_path), local_files_only=True, dtype=dtype)
            self._check_config(model.config, str(model_path))
        elif self.tiny:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = model_cls(self.vision_config())
            model = model.to(dtype)
        elif os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
            model = model_cls.from_pretrained(self.hf_id, dtype=dtype)
            self._check_config(model.config, self.hf_id)
        else:
            raise RuntimeError(
                f"vision tower {self.name!r} needs its weights ({self.hf_id}): pass a local folder with "
                f"--vision-path, or set {ALLOW_DOWNLOAD_ENV}=1 to download from the Hugging Face hub, "
                f"or use the offline tiny twin {self.tiny_twin!r} (random weights)"
            )
        model.requires_grad_(False)
        return model.eval()

    def _check_config(self, config: Any, source: str) -> None:
        got = (config.image_size, config.patch_size, config.hidden_size)
        want = (self.native_image_size or self.image_size, self.patch_size, self.hidden_size)
        if got != want:
            raise ValueError(
                f"{source}: (image_size, patch_size, hidden_size) = {got}, but tower {self.name!r} expects {want}"
            )

    def preprocess(self, img: PIL.Image.Image, mode: str = "pad", size: int | None = None) -> torch.Tensor:
        """``(3, size, size)`` float32 pixels for this tower (see ``preprocess_image``); ``size``
        defaults to ``image_size`` (S2 asks for ``image_size * max(scales)``)."""
        return preprocess_image(img, size=size or self.image_size, mean=self.mean, std=self.std, mode=mode)

    def image_spec(self, mode: str = "pad", size: int | None = None) -> ImageSpec:
        """The preprocessing of this tower as data for :class:`barnfast.data.dataset.StageDataset`."""
        return ImageSpec(size=size or self.image_size, mean=tuple(self.mean), std=tuple(self.std), mode=mode)

    def image_processor(self) -> Any:
        """A transformers ``CLIPImageProcessor`` equal to ``preprocess(mode="resize")``, to save
        with an exported model, for every family (see ``_clip_processor_cls``). (The LLaVA-1.5 pad
        step is not part of it; transformers' LLaVA processor resizes directly.)"""
        _, _, processor_cls = _family_classes(self.family)
        return processor_cls(
            do_resize=True,
            size={"shortest_edge": self.image_size},
            resample=PIL.Image.Resampling.BICUBIC,
            do_center_crop=True,
            crop_size={"height": self.image_size, "width": self.image_size},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(self.mean),
            image_std=list(self.std),
            do_convert_rgb=True,
        )


def encode_images(tower: VisionTower, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch features of a frozen tower: ``(I, 3, S, S)`` → ``(I, num_tokens, hidden_size)``.

    ``hidden_states[tower.feature_layer]`` with the prefix tokens (CLS, registers) dropped, in the
    model's dtype, without autograd.
    """
    if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, tower.image_size, tower.image_size):
        raise ValueError(
            f"pixel_values must be (I, 3, {tower.image_size}, {tower.image_size}), got {tuple(pixel_values.shape)}"
        )
    param = next(model.parameters())
    with torch.no_grad():
        out = model(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        features = out.hidden_states[tower.feature_layer]  # (I, num_prefix_tokens + P, H)
    return features[:, tower.num_prefix_tokens:] if tower.drop_cls else features


def _tiny_twin(real: VisionTower, **size) -> VisionTower:
    """The offline twin of ``real``: same family, preprocessing, feature layer and prefix tokens;
    2 layers of width 32 at 56 pixels (16 visual tokens), so a train step runs in milliseconds on a CPU."""
    native = None if real.native_image_size is None else 98  # DINOv2: interpolated position embeddings too
    return dataclasses.replace(real, name=real.tiny_twin, hf_id=None, tiny=True, hidden_size=32, num_layers=2,
                               num_heads=2, intermediate_size=128 if real.family.startswith("dinov2") else 64,
                               image_size=56, native_image_size=native, **size)


_CLIP_L_336 = dict(family="clip", image_size=336, patch_size=14, mean=CLIP_MEAN, std=CLIP_STD, feature_layer=-2,
                   drop_cls=True, hidden_size=1024, tiny=False)
# SigLIP so400m/14 at 384 (LLaVA-MORE): 27 layers of 1152, no CLS token; layer -2 as for CLIP.
_SIGLIP_SO400M = dict(family="siglip", image_size=384, patch_size=14, mean=SIGLIP_MEAN, std=SIGLIP_STD,
                      feature_layer=-2, drop_cls=False, num_prefix_tokens=0, hidden_size=1152, num_layers=27,
                      num_heads=16, intermediate_size=4304, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                      tiny=False)
_DINOV2_L = dict(image_size=336, native_image_size=518, patch_size=14, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 feature_layer=-2, drop_cls=True, hidden_size=1024, num_layers=24, num_heads=16,
                 intermediate_size=4096, hidden_act="gelu", layer_norm_eps=1e-6, tiny=False)

_REAL = [
    VisionTower(name="clip-l-336", hf_id="openai/clip-vit-large-patch14-336", tiny_twin="clip-l-336-tiny",
                **_CLIP_L_336),
    VisionTower(name="siglip-so400m-384", hf_id="google/siglip-so400m-patch14-384",
                tiny_twin="siglip-so400m-384-tiny", **_SIGLIP_SO400M),
    VisionTower(name="siglip2", hf_id="google/siglip2-so400m-patch14-384", tiny_twin="siglip2-tiny",
                **_SIGLIP_SO400M),
    VisionTower(name="dinov2-l", family="dinov2", hf_id="facebook/dinov2-large", tiny_twin="dinov2-l-tiny",
                num_prefix_tokens=1, **_DINOV2_L),
    VisionTower(name="dinov2-l-reg", family="dinov2-reg", hf_id="facebook/dinov2-with-registers-large",
                tiny_twin="dinov2-l-reg-tiny", num_prefix_tokens=5, **_DINOV2_L),  # CLS + 4 registers
]
VISION_TOWERS: dict[str, VisionTower] = {t.name: t for t in _REAL} | {t.tiny_twin: _tiny_twin(t) for t in _REAL}
_ALIASES = {"clip-tiny": "clip-l-336-tiny", "siglip-tiny": "siglip-so400m-384-tiny", "dinov2-tiny": "dinov2-l-tiny"}


def from_name(name: str) -> VisionTower:
    """The registered tower ``name`` (or alias); unknown names raise ``ValueError`` listing the known ones."""
    key = _ALIASES.get(name, name)
    if key not in VISION_TOWERS:
        known = ", ".join(sorted([*VISION_TOWERS, *_ALIASES]))
        raise ValueError(f"unknown vision tower {name!r}; known: {known}")
    return VISION_TOWERS[key]
