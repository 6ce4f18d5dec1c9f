"""Vision-feature cache: the frozen tower's output per image, computed once, reused by every stage and backbone.

The tower is frozen in both stages and is the same for every backbone of a sweep (same registry
entry, same weights, same seed), so its output for an image depends only on the image's bytes
and the *settings*: encoder name, its weights' identity (the sha256 of the weight files' bytes for a
local ``--vision-path``, never the path: weights replaced at the same path must miss; the tiny twin's
registry entry and seed; the hub id), the preprocessing (size, mean, std, pad | resize), the S2
scales and the stored dtype (fp16 | bf16).

Layout (``--vision-cache DIR``)::

    DIR/<encoder>-<sha256(settings)[:16]>/settings.json        what the entries were computed with
    DIR/<encoder>-<...>/<key[:2]>/<key>.bfv                  one entry per image content
        key = sha256 of the image file's bytes (two files with the same bytes share an entry)

An entry is a 64-byte header and the raw features ``(P, C)`` (P visual tokens, C = width · number
of S2 scales; all scales of an image in one entry, concatenated on channels as the projector
reads them)::

    magic "BFVC" | version u32 | P u32 | C u32 | dtype code u32 | crc32(payload) u32 | nbytes u64 | zero pad

Entries are written to a temporary file and renamed into place (a crash never leaves a
half-written entry under its final name) and read through ``np.memmap``. Every read checks the
file size against the header and the header against the settings, and the payload's CRC-32 (about
0.2 ms for a 1.2 MB CLIP-L entry), so a truncated or corrupted entry is a miss: the precompute pass
(:meth:`VisionFeatureCache.fill`) encodes it again, and a micro-batch that meets one mid-run falls
back to pixels and the tower.

Size: ``P · C · 2`` bytes per image (+ 64). CLIP-L/336 in fp16 is 576 × 1024 × 2 = 1.18 MB per
image, so LLaVA-665k (about 625k samples with an image; 40k are text-only) takes about 0.74 TB,
BLIP-558k about 0.66 TB; S2 with scales 1, 2 doubles it (the width doubles). ``fill`` prints the
exact size it will write and refuses to start when the disk cannot hold it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from barnfast.errors import SampleError

MAGIC = b"BFVC"
VERSION = 1
_HEADER = struct.Struct("<4sIIIIIQ")  # magic, version, P, C, dtype code, crc32, payload bytes
HEADER_BYTES = 64
DTYPES = {"fp16": (torch.float16, 1), "bf16": (torch.bfloat16, 2)}
_CODE_TO_DTYPE = {code: dt for dt, code in DTYPES.values()}
_HEADROOM_BYTES = 64 << 20  # leave 64 MiB free besides the estimate (filesystem metadata, other writers)


class VisionCacheDiskError(RuntimeError):
    """The disk under the cache folder cannot hold the features about to be written."""


@dataclass(frozen=True)
class CacheSettings:
    """Everything the features depend on besides the image bytes."""

    encoder: str  # registry name, e.g. "clip-l-336"
    weights: str  # content hash of a local folder's weight files, "random-init seed N; ..." (tiny), or hub id
    s2_scales: tuple[int, ...]
    image_aspect: str  # "pad" | "resize"
    dtype: str  # "fp16" | "bf16"
    num_tokens: int  # P
    width: int  # C = hidden_size · len(s2_scales)
    preprocess: str = ""  # the ImageSpec the pixels were made with: size, mean, std, mode

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def entry_bytes(self) -> int:
        return HEADER_BYTES + self.num_tokens * self.width * 2


def image_key(path: str | Path) -> str:
    """sha256 of the image file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


class VisionFeatureCache:
    """One settings folder of the cache (see the module docstring)."""

    def __init__(self, root: str | Path, settings: CacheSettings):
        if settings.dtype not in DTYPES:
            raise ValueError(f"vision cache dtype must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
        self.settings = settings
        self.dir = Path(root) / f"{settings.encoder}-{settings.digest()}"
        self.dtype, self._code = DTYPES[settings.dtype]
        self.recomputed = 0  # entries found truncated/corrupt and encoded again by fill()
        self.failed: dict[Path, str] = {}  # images fill() could not decode (this rank's share): path -> reason

    # -- entries ----------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.bfv"

    def get(self, key: str) -> torch.Tensor | None:
        """The ``(P, C)`` features of an image, or None when the entry is missing, truncated or corrupt."""
        path = self.path(key)
        s = self.settings
        try:
            size = path.stat().st_size
            if size != s.entry_bytes:
                return None
            with open(path, "rb") as f:
                magic, version, P, C, code, crc, nbytes = _HEADER.unpack(f.read(_HEADER.size))
            if (magic, version, P, C, code, nbytes) != (MAGIC, VERSION, s.num_tokens, s.width, self._code,
                                                       size - HEADER_BYTES):
                return None
            payload = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(P * C,))
            if zlib.crc32(payload) != crc:
                return None
            return torch.from_numpy(np.array(payload)).view(self.dtype).view(P, C)
        except (OSError, ValueError, struct.error):
            return None

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store ``(P, C)`` features (cast to the cache dtype) atomically."""
        s = self.settings
        if tuple(features.shape) != (s.num_tokens, s.width):
            raise ValueError(f"features must be ({s.num_tokens}, {s.width}), got {tuple(features.shape)}")
        payload = features.detach().to("cpu", self.dtype).contiguous().view(torch.uint16).numpy().tobytes()
        header = _HEADER.pack(MAGIC, VERSION, s.num_tokens, s.width, self._code, zlib.crc32(payload), len(payload))
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header.ljust(HEADER_BYTES, b"\0"))
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- the precompute pass ----------------------------------------------------------------------
    def fill(self, paths: Sequence[str | Path], load: Callable[[Path], torch.Tensor],
             encode: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int = 32, rank: int = 0,
             world_size: int = 1, show_progress: bool = True, log: Callable[[str], None] | None = print
             ) -> dict[Path, str]:
        """Encode every image of ``paths`` that has no valid entry; returns ``{path: key}`` for all.

        ``load(path)`` gives the preprocessed ``(3, s·S, s·S)`` pixels, ``encode(pixels)`` the
        ``(n, P, C)`` features. Rank ``r`` of ``world_size`` encodes every ``world_size``-th missing
        image. Before writing, the size is printed (``log``) and checked against the free disk space.
        An image that ``load`` cannot decode (``SampleError``) gets no entry and is recorded in ``failed``;
        the micro-batches holding it fall back to pixels, where the sample is skipped and listed.
        """
        keys = {Path(p): image_key(p) for p in dict.fromkeys(Path(p) for p in paths)}
        first_path: dict[str, Path] = {}
        for p, k in keys.items():
            first_path.setdefault(k, p)
        missing, corrupt = [], 0
        for k in first_path:
            if self.get(k) is None:
                missing.append(k)
                corrupt += self.path(k).exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(asdict(self.settings), indent=2))
        need = len(missing) * self.settings.entry_bytes
        if log is not None and rank == 0:
            log(f"vision cache {self.dir}: {len(first_path) - len(missing)} of {len(first_path)} images cached, "
                f"{len(missing)} to encode ({corrupt} truncated/corrupt); writing {human_bytes(need)} "
                f"({human_bytes(self.settings.entry_bytes)} per image, {self.settings.dtype})")
        free = shutil.disk_usage(self.dir).free
        if need + _HEADROOM_BYTES > free:
            raise VisionCacheDiskError(
                f"vision cache {self.dir}: {len(missing)} images need {human_bytes(need)} but the disk has "
                f"{human_bytes(free)} free; point --vision-cache at a larger disk, or run without it")
        mine = missing[rank::world_size]
        self.recomputed += corrupt if rank == 0 else 0
        bar = tqdm(total=len(mine), desc="vision cache", unit="img", disable=not show_progress, mininterval=1.0)
        for i in range(0, len(mine), batch_size):
            chunk, pixels = [], []
            for k in mine[i:i + batch_size]:
                try:
                    pixels.append(load(first_path[k]))
                    chunk.append(k)
                except SampleError as exc:  # no entry: its micro-batches decode it, fail, and list the sample
                    self.failed[first_path[k]] = str(exc)
                    if log is not None:
                        log(f"vision cache: not cached, {exc}")
            if chunk:
                feats = encode(torch.stack(pixels))
                for k, f in zip(chunk, feats):
                    self.put(k, f)
            bar.update(len(mine[i:i + batch_size]))
        bar.close()
        return keys


def settings_for(vision, *, s2_scales: Sequence[int], image_aspect: str, dtype: str, seed: int,
                 vision_path: str | None = None, weights_id: str | None = None, image_spec=None) -> CacheSettings:
    """The settings of a tower registry entry as a run uses it.

    ``weights_id``: the identity of the weights (the trainer passes the run fingerprint's, a content
    hash for a local folder); without it a local folder is hashed here. ``image_spec``: the
    :class:`~barnfast.data.images.ImageSpec` of the pixels (its fields go into the key).
    """
    if weights_id is not None:
        weights = weights_id
    elif vision_path is not None:
        weights = "sha256:" + _folder_digest(Path(vision_path))
    elif vision.tiny:
        weights = f"random-init seed {seed}"
    else:
        weights = vision.hf_id
    preprocess = "" if image_spec is None else json.dumps(asdict(image_spec), sort_keys=True)
    return CacheSettings(encoder=vision.name, weights=weights, s2_scales=tuple(int(s) for s in s2_scales),
                         image_aspect=image_aspect, dtype=dtype, num_tokens=vision.num_tokens,
                         width=vision.hidden_size * len(s2_scales), preprocess=preprocess)


def _folder_digest(path: Path) -> str:
    """sha256 over (relative name, sha256 of bytes) of every file of a weights folder (or of one file)."""
    if path.is_file():
        return image_key(path)
    h = hashlib.sha256()
    for p in sorted(x for x in path.rglob("*") if x.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{image_key(p)}\n".encode())
    return h.hexdigest()
