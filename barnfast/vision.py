"""Vision-tower registry: which encoder, its preprocessing, and how its patch features are taken.

A tower is frozen and read LLaVA-1.5's way: ``hidden_states[feature_layer]`` (-2, the
penultimate layer's output) with the CLS token dropped, i.e. what transformers'
``LlavaModel.get_image_features`` selects with ``vision_feature_layer=-2`` and
``vision_feature_select_strategy="default"``.

Every real tower has a ``-tiny`` twin of the same family and preprocessing with random weights
(deterministic from a seed), so the pipeline runs offline. The family names the transformers
classes (``_FAMILIES``); SigLIP / DINOv2 are added there and in ``VISION_TOWERS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch

from barnfast.data.images import preprocess_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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
    raise ValueError(f"unknown vision family {family!r}; known: clip")


@dataclass(frozen=True)
class VisionTower:
    """A named vision encoder and its preprocessing.

    Real towers load from a local folder (or the hub when ``BARNFAST_ALLOW_DOWNLOAD=1``); tiny
    towers are random-init from ``vision_config()`` and need no files.
    """

    name: str
    family: str  # decides the transformers classes: "clip" (siglip / dinov2 later)
    hf_id: str | None  # hub id of the real weights; None for tiny towers
    image_size: int  # S of the (3, S, S) input
    patch_size: int
    hidden_size: int  # width of each visual token
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_layer: int  # index into hidden_states (0 = embeddings); -2 = penultimate layer
    drop_cls: bool  # drop the first (CLS) token of the selected layer
    tiny: bool
    tiny_twin: str  # name of the offline twin (itself for a tiny tower)
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"  # OpenAI CLIP's activation

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{self.name}: image_size {self.image_size} not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{self.name}: hidden_size {self.hidden_size} not a multiple of num_heads {self.num_heads}"
            )
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise ValueError(
                f"{self.name}: feature_layer {self.feature_layer} outside hidden_states of {self.num_layers} layers"
            )

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image after the CLS drop: ``(image_size // patch_size) ** 2`` (576 for CLIP-L/336)."""
        return (self.image_size // self.patch_size) ** 2 + (0 if self.drop_cls else 1)

    def vision_config(self) -> Any:
        """The transformers vision config of this architecture (e.g. ``CLIPVisionConfig``)."""
        config_cls, _, _ = _family_classes(self.family)
        return config_cls(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=1e-5,
        )

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
        want = (self.image_size, self.patch_size, self.hidden_size)
        if got != want:
            raise ValueError(
                f"{source}: (image_size, patch_size, hidden_size) = {got}, but tower {self.name!r} expects {want}"
            )

    def preprocess(self, img: PIL.Image.Image, mode: str = "pad") -> torch.Tensor:
        """``(3, image_size, image_size)`` float32 pixels for this tower (see ``preprocess_image``)."""
        return preprocess_image(img, size=self.image_size, mean=self.mean, std=self.std, mode=mode)

    def image_processor(self) -> Any:
        """A transformers ``CLIPImageProcessor`` equal to ``preprocess(mode="resize")``, to save
        with an exported model. (The LLaVA-1.5 pad step is not part of it; transformers' LLaVA
        processor resizes directly.)"""
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

    ``hidden_states[tower.feature_layer]`` with CLS dropped, in the model's dtype, without autograd.
    """
    if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, tower.image_size, tower.image_size):
        raise ValueError(
            f"pixel_values must be (I, 3, {tower.image_size}, {tower.image_size}), got {tuple(pixel_values.shape)}"
        )
    param = next(model.parameters())
    with torch.no_grad():
        out = model(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        features = out.hidden_states[tower.feature_layer]  # (I, 1 + P, H)
    return features[:, 1:] if tower.drop_cls else features


_CLIP_L_336 = dict(
    family="clip",
    image_size=336,
    patch_size=14,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    feature_layer=-2,
    drop_cls=True,
)

VISION_TOWERS: dict[str, VisionTower] = {
    "clip-l-336": VisionTower(
        name="clip-l-336",
        hf_id="openai/clip-vit-large-patch14-336",
        hidden_size=1024,
        tiny=False,
        tiny_twin="clip-l-336-tiny",
        **_CLIP_L_336,
    ),
    # 56 / 14 → 16 visual tokens of width 32: the whole train step runs on a CPU in milliseconds.
    "clip-l-336-tiny": VisionTower(
        name="clip-l-336-tiny",
        hf_id=None,
        hidden_size=32,
        tiny=True,
        tiny_twin="clip-l-336-tiny",
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        **{**_CLIP_L_336, "image_size": 56},
    ),
}
_ALIASES = {"clip-tiny": "clip-l-336-tiny"}


def from_name(name: str) -> VisionTower:
    """The registered tower ``name`` (or alias); unknown names raise ``ValueError`` listing the known ones."""
    key = _ALIASES.get(name, name)
    if key not in VISION_TOWERS:
        known = ", ".join(sorted([*VISION_TOWERS, *_ALIASES]))
        raise ValueError(f"unknown vision tower {name!r}; known: {known}")
    return VISION_TOWERS[key]
