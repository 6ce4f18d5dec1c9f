"""Recipe configuration: composed dataclasses, loaded from TOML, overridden from the command line.

A recipe file (``barnfast/recipes/*.toml`` or any path) holds the sections ``[model]``, ``[data]``,
``[train]`` and one ``[[stages]]`` table per stage. Every field is validated in ``__post_init__``
and a bad value raises :class:`~barnfast.errors.ConfigError` naming the field, before any work.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from barnfast.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass
class ModelConfig:
    backbone: str = "llama1"
    """Registry name of the LLM (``barnfast.models.backbones``), e.g. ``llama3`` or ``llama3-tiny``."""
    model_path: str | None = None
    """Local Hugging Face checkpoint folder for the LLM; None: the registry's (tiny: random weights)."""
    vision: str = "auto"
    """Vision tower registry name; ``auto``: ``clip-l-336``, or its tiny twin for a ``-tiny`` backbone."""
    vision_path: str | None = None
    """Local folder of the vision tower's weights."""
    projector_approximate: str = "none"
    """GELU of the projector: ``none`` (erf, as LLaVA-1.5) or ``tanh``."""
    pad_vocab_to_multiple_of: int = 64
    """The ``<image>`` token is appended to the vocabulary; embeddings are resized to a multiple of this."""
    projector: str = "mlp2x_gelu"
    """Vision-language projector: ``mlp2x_gelu`` (LLaVA-1.5, fused kernel), ``linear`` (LLaVA-1) or
    ``perceiver`` (Idefics2's resampler to ``perceiver_latents`` tokens per image; exports in barnfast's format)."""
    perceiver_latents: int = 64
    """Learned queries of the perceiver, i.e. visual tokens per image."""
    perceiver_depth: int = 3
    """Resampler layers of the perceiver."""
    s2_scales: list[int] = field(default_factory=lambda: [1])
    """S2 multi-scale features (``--s2``): ``[1]`` off, ``[1, 2]`` or ``[1, 2, 3]`` (LLaVA-MORE); the token
    count stays, the projector's input width is the tower's times the number of scales."""

    def __post_init__(self):
        _check(bool(self.backbone), "model.backbone", "must name a backbone")
        _check(self.projector in ("mlp2x_gelu", "linear", "perceiver"), "model.projector",
               f"must be mlp2x_gelu|linear|perceiver, got {self.projector!r}")
        _check(self.perceiver_latents >= 1, "model.perceiver_latents", f"must be >= 1, got {self.perceiver_latents}")
        _check(self.perceiver_depth >= 1, "model.perceiver_depth", f"must be >= 1, got {self.perceiver_depth}")
        scales = list(self.s2_scales)
        _check(bool(scales) and all(isinstance(x, int) for x in scales) and scales[0] == 1
               and all(b > a for a, b in zip(scales, scales[1:])) and scales[-1] <= 4, "model.s2_scales",
               f"must start at 1 and increase strictly up to 4, e.g. [1, 2], got {self.s2_scales!r}")
        _check(self.projector_approximate in ("none", "tanh"), "model.projector_approximate",
               f"must be 'none' or 'tanh', got {self.projector_approximate!r}")
        _check(self.pad_vocab_to_multiple_of >= 1, "model.pad_vocab_to_multiple_of", "must be >= 1")


@dataclass
class DataConfig:
    stage1_data: str | None = None
    """LLaVA JSON/JSONL of stage 1 (captions); None: the built-in synthetic set, created on first use."""
    stage2_data: str | None = None
    """LLaVA JSON/JSONL of stage 2 (instructions); None: the built-in synthetic set."""
    image_root: str | None = None
    """Folder the ``image`` paths of the data files are relative to (default: the data file's folder)."""
    allow_outside_image_root: bool = False
    """False: an ``image`` path that is absolute or resolves outside ``image_root`` (``..``, a symlink out)
    skips its sample, listed; True: such paths are read (the data is trusted)."""
    synthetic_dir: str | None = None
    """Where the built-in synthetic data lives; None: ``<output_dir>/data``."""
    synthetic_stage1: int = 512
    synthetic_stage2: int = 512
    synthetic_eval: int = 100
    image_aspect: str = "pad"
    """LLaVA-1.5 ``pad`` (to a square of the mean colour, then resize; the recipes' default, as LLaVA-1.5)
    or ``resize`` (shortest side to the tower's size, centre crop: what the exported processor does)."""
    max_skip_fraction: float = 0.01
    """The run fails when more than this share of a stage's samples is skipped as bad input."""
    num_workers: int = 0
    """DataLoader worker processes that build micro-batches (image decoding, collation)."""
    vision_cache: str | None = None
    """Folder of the vision-feature cache (``--vision-cache``): the frozen tower's output per image is
    computed once and read by every stage and backbone; None or ``""``: off (the tower runs every step)."""
    vision_cache_dtype: str = "fp16"
    """Stored dtype of cached features: ``fp16`` or ``bf16``."""
    vision_cache_batch: int = 32
    """Images per tower call in the cache's precompute pass."""
    max_length: int = 2048
    """Longest sample in tokens after ``<image>`` expansion, the same limit for every backbone (LLaVA-1.5's
    ``model_max_length`` 2048): a backbone's own context never decides which samples a sweep trains on. Must
    not exceed the backbone's context (checked when the run starts)."""
    exclude_samples: str | None = None
    """JSONL of ``{"stage", "id", "reason"}``: samples left out of that stage (the sweep writes one with the
    samples some backbone of the sweep cannot take, so that every backbone drops them)."""
    overlong: str = "skip"
    """A sample longer than ``max_length``: ``skip`` (listed in skipped_samples.jsonl) or ``truncate``
    (LLaVA-1.5: ids and labels cut at ``max_length`` after image expansion)."""
    image_at_turn_start: bool = False
    """Move each ``<image>`` to the start of its turn (``<image>\\n`` + the rest, stripped), as LLaVA's
    ``preprocess_multimodal``; False keeps the placeholder where the data put it."""

    def __post_init__(self):
        if self.vision_cache == "":
            self.vision_cache = None
        _check(self.vision_cache_dtype in ("fp16", "bf16"), "data.vision_cache_dtype",
               f"must be 'fp16' or 'bf16', got {self.vision_cache_dtype!r}")
        _check(self.vision_cache_batch >= 1, "data.vision_cache_batch", "must be >= 1")
        _check(self.max_length >= 16, "data.max_length", f"must be >= 16, got {self.max_length}")
        if self.exclude_samples == "":
            self.exclude_samples = None
        _check(self.image_aspect in ("pad", "resize"), "data.image_aspect", f"must be 'pad' or 'resize', got "
               f"{self.image_aspect!r}")
        _check(self.overlong in ("skip", "truncate"), "data.overlong",
               f"must be 'skip' or 'truncate', got {self.overlong!r}")
        _check(0.0 <= self.max_skip_fraction <= 1.0, "data.max_skip_fraction", "must be in [0, 1]")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        for name in ("synthetic_stage1", "synthetic_stage2", "synthetic_eval"):
            _check(getattr(self, name) >= 1, f"data.{name}", "must be >= 1")


@dataclass
class StageConfig:
    name: str = "stage1"
    """``stage1`` (projector on captions) or ``stage2`` (projector + LLM on instructions)."""
    lr: float = 1e-3
    global_batch: int = 256
    """Samples per optimizer step, whatever the number of processes (accumulation fills the gap)."""
    epochs: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_llm: bool = False
    """Stage 1: False (projector only). Stage 2: True (projector + LLM)."""
    template: str = "auto"
    """Chat template: ``plain`` for stage 1; ``auto`` = the backbone's."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: the whole epochs)."""
    image_aspect: str = "data"
    """Image preprocessing of this stage: ``pad``, ``resize`` or ``data`` (``data.image_aspect``). LLaVA-1.5
    differs per stage: stage 1 ``resize`` (pretrain.sh sets no image_aspect_ratio), stage 2 ``pad``."""
    group_by_modality: bool = False
    """Every step all image samples or all text-only samples (LLaVA's ``group_by_modality_length``), the
    leftovers of both in the last step(s); the order stays seeded and the same for every backbone."""

    def __post_init__(self):
        p = f"stages[{self.name}]"
        _check(self.name in ("stage1", "stage2"), f"{p}.name", f"must be 'stage1' or 'stage2', got {self.name!r}")
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _check(self.global_batch >= 1, f"{p}.global_batch", f"must be >= 1, got {self.global_batch}")
        _check(self.epochs >= 1, f"{p}.epochs", "must be >= 1")
        _check(0.0 <= self.warmup_ratio < 1.0, f"{p}.warmup_ratio", "must be in [0, 1)")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(self.max_grad_norm > 0, f"{p}.max_grad_norm", "must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, f"{p}.max_steps", "must be >= 1 or unset")
        _check(self.image_aspect in ("data", "pad", "resize"), f"{p}.image_aspect",
               f"must be 'data', 'pad' or 'resize', got {self.image_aspect!r}")


@dataclass
class TrainConfig:
    seed: int = 0
    token_budget: int = 8192
    """Tokens per packed micro-batch (images counted as their visual tokens)."""
    packing: bool = True
    """False: padded micro-batches of ``micro_batch_size`` samples (the LLaVA way), for comparison."""
    micro_batch_size: int = 16
    """Samples per padded micro-batch when ``packing`` is False."""
    dtype: str = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU; or ``fp32`` / ``bf16``."""
    max_length: int | None = None
    """Moved to ``data.max_length`` (one limit for every backbone); setting it here is an error."""
    log_every: int = 1
    system_prompt: str | None = None
    """System text of the chat template in training, evaluation and the export: None (unset) = the
    template's own (LLaVA's); ``""`` = no system text."""
    kernel_backend: str = "auto"
    """Backend of barnfast.kernels ops: ``auto`` | ``triton`` | ``torch``."""
    parallel: str = "ddp"
    """Data parallelism over processes: ``ddp`` (replicas) or ``fsdp`` (FSDP2, sharded per decoder layer)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of storing them."""
    optimizer: str = "adamw"
    """``adamw`` (torch) or ``adamw8bit`` (torchao, 8-bit optimizer states; CUDA)."""
    float8: bool = False
    """torchao float8 training of the decoder's linear layers (CUDA, compute capability >= 8.9)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep (the newest)."""
    max_nonfinite_in_a_row: int = 5
    """Steps with a non-finite loss or gradient norm are skipped; more than this many in a row stop the run."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers (``--report-to``): ``tensorboard`` and/or ``wandb`` (barnfast/training/tracking.py)."""
    report_dir: str | None = None
    """TensorBoard event folder (None: ``<output_dir>/tensorboard``; a sweep uses ``<sweep>/tensorboard/<run>``)."""
    report_group: str | None = None
    """W&B group of the run (a sweep sets its folder name, so its runs are grouped)."""

    def __post_init__(self):
        _check(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _check(self.token_budget >= 16, "train.token_budget", f"must be >= 16, got {self.token_budget}")
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(self.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"must be auto|fp32|bf16, got {self.dtype!r}")
        _check(self.max_length is None, "train.max_length",
               "moved to data.max_length (one length limit for every backbone, default 2048)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.kernel_backend in ("auto", "triton", "torch"), "train.kernel_backend",
               f"must be auto|triton|torch, got {self.kernel_backend!r}")
        _check(self.parallel in ("ddp", "fsdp"), "train.parallel", f"must be ddp|fsdp, got {self.parallel!r}")
        _check(self.optimizer in ("adamw", "adamw8bit"), "train.optimizer",
               f"must be adamw|adamw8bit, got {self.optimizer!r}")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.max_nonfinite_in_a_row >= 0, "train.max_nonfinite_in_a_row", "must be >= 0")
        if isinstance(self.report_to, str):
            self.report_to = [x.strip() for x in self.report_to.split(",") if x.strip() and x.strip() != "none"]
        bad = [x for x in self.report_to if x not in ("tensorboard", "wandb")]
        _check(not bad, "train.report_to", f"must list tensorboard and/or wandb, got {bad}")


@dataclass
class LoraSection:
    enabled: bool = False
    """Stage 2 trains LoRA adapters on the LLM (plus the projector) instead of the full LLM."""
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge_on_export: bool = True
    """Merge the adapters into the LLM weights in the exported Hugging Face folder."""

    def __post_init__(self):
        _check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _check(len(self.target_modules) >= 1, "lora.target_modules", "must name at least one module")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    output_dir: str = "runs/default"

    def __post_init__(self):
        _check(len(self.stages) >= 1, "stages", "at least one stage is needed")
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), "stages", f"stage names repeat: {names}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraSection}


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a finite number", str: "a string",
            type(None): "unset"}.get(tp, getattr(tp, "__name__", str(tp)))


def _type_error(tp, value) -> str | None:
    """Why ``value`` (as TOML or ``--set`` gives it) is not of the annotated type ``tp``; None when it is.

    Strict on purpose: ``"False"`` is not a bool (it would be truthy), ``true`` is not a float (lr 1.0),
    ``1.5`` is not an int (fractional epochs are not supported), ``inf`` / ``nan`` are no numbers.
    """
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = [_type_error(a, value) for a in args if a is not type(None)]
        return None if any(e is None for e in errors) else errors[0]
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            return f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        for i, item in enumerate(value):
            why = _type_error(typing.get_args(tp)[0], item)
            if why:
                return f"item {i}: {why}"
        return None
    got = f"got {value!r} ({type(value).__name__})"
    if tp is bool:
        if isinstance(value, bool):
            return None
        hint = ""
        if isinstance(value, str) and value.strip().strip("\"'").lower() in ("true", "false", "yes", "no", "on", "off",
                                                                              "1", "0"):
            hint = "; use true or false, lower case and without quotes (e.g. --set train.packing=false)"
        return f"expected {_type_name(tp)}, {got}{hint}"
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        hint = "; fractional values are not supported" if isinstance(value, float) else ""
        return f"expected {_type_name(tp)}, {got}{hint}"
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {_type_name(tp)}, {got}"
        return None if math.isfinite(value) else f"expected {_type_name(tp)}, {got}"
    if tp is str:
        return None if isinstance(value, str) else f"expected {_type_name(tp)}, {got}"
    return None  # a type this checker does not know: the dataclass's own __post_init__ has the word


def check_types(cls, values: dict, where: str) -> None:
    """Refuse a value whose type differs from the field's annotation, naming ``<where>.<field>``.

    Built from the dataclass annotations, so a field added to any section is checked without more code.
    """
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        why = _type_error(hints[name], value)
        if why:
            raise ConfigError(f"{where}.{name}: {why}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a table of fields, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    if cls is StageConfig and isinstance(values.get("name"), str):
        where = f"stages[{values['name']}]"  # the name __post_init__ uses in its messages
    check_types(cls, values, where)
    return cls(**values)


def recipe_from_dict(d: dict) -> Recipe:
    """Build a validated Recipe from a nested dict (the TOML document)."""
    top = set(d) - {*_SECTIONS, "stages", "output_dir"}
    if top:
        raise ConfigError(f"recipe: unknown section(s) {sorted(top)}")
    kwargs = {name: _build(cls, d.get(name, {}), name) for name, cls in _SECTIONS.items()}
    if not isinstance(d.get("stages", []), list):
        raise ConfigError(f"stages: must be a list of [[stages]] tables, got {d['stages']!r}")
    stages = [_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(d.get("stages", []))]
    check_types(Recipe, {"output_dir": d.get("output_dir", "runs/default")}, "recipe")
    return Recipe(**kwargs, stages=stages or [StageConfig()], output_dir=d.get("output_dir", "runs/default"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe given by name (``llava15``, looked up in barnfast/recipes/) or by file path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.toml"))
    raise ConfigError(f"recipe: {name_or_path!r} is neither a .toml file nor a known recipe {known}")


def load_recipe(name_or_path: str, overrides: dict | None = None) -> Recipe:
    """Load a TOML recipe and apply ``overrides`` given as dotted keys (``{"train.seed": 3}``).

    A stage field is overridden for every stage with ``stages.<field>`` or for one with
    ``stage1.<field>`` / ``stage2.<field>``.
    """
    path = resolve_recipe_path(name_or_path)
    raw = path.read_bytes()
    try:
        d = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib says "(at line L, column C)", or "(at end of document)" for an unclosed table or array.
        lines = raw.count(b"\n") + 1
        raise ConfigError(f"{path}: not valid TOML: {e} (the file has {lines} lines)") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        head, _, leaf = key.partition(".")
        if head == "output_dir" and not leaf:
            d["output_dir"] = value
        elif head in _SECTIONS:
            d.setdefault(head, {})[leaf] = value
        elif head == "stages":
            for s in d.setdefault("stages", []):
                s[leaf] = value
        elif head in ("stage1", "stage2"):
            matches = [s for s in d.get("stages", []) if s.get("name") == head]
            if not matches:
                raise ConfigError(f"{key}: the recipe has no stage named {head}")
            matches[0][leaf] = value
        else:
            raise ConfigError(f"override {key!r}: unknown section {head!r}")
    return recipe_from_dict(d)
