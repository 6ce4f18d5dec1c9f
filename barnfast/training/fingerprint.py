"""A run is its fingerprint: one hash of everything that defines what a run computes.

The fingerprint is the sha256 of the canonical JSON (sorted keys, no spaces) of a flat dict of
*fields*; the fields are stored beside it (``run.json``: ``fingerprint``, ``fingerprint_fields``)
so that a refusal can list what differs, field by field (old → new). The fields:

- every field of the resolved recipe (model, data, train, lora, every stage), flattened to dotted
  keys (``train.seed``, ``stages[stage2].lr``), minus the ones that do not change what is computed
  (:data:`NOT_DEFINING`: the output folder, logging and checkpoint cadence, DataLoader workers, the
  skip threshold, the cache folder's path); paths to weights and data are replaced by the identity
  of what they hold (below); ``data.vision_cache`` becomes on/off (a cached run reads fp16/bf16
  features, an uncached one fp32, so the losses differ slightly);
- ``identity.backbone`` / ``identity.vision``: a tiny twin's weights are random-init from the seed, so
  its identity is the registry entry (a hash of its architecture fields), the seed and the torch /
  transformers versions that draw the weights; a local folder's is the sha256 of its weight and
  config files' bytes (:func:`weights_identity`); a hub id is the id (no revision is pinned);
- ``data.<stage>``: the sha256 of each stage's data file, the image root's resolved path for user
  data (image bytes are not hashed here: 600k files; the vision cache keys each by its content),
  and the sha256 of the sweep's exclusion list when there is one;
- ``barnfast.version``.

Not in it: the number of processes. The sample order and the samples of each optimizer step are a
function of (seed, epoch, number of samples, global batch) only (:mod:`barnfast.data.packing`), so a
run may resume on another number of GPUs.

Hashing weight files costs one read (a 7B checkpoint, 13.5 GB, takes ~30 s at 500 MB/s); the digest
of a file is memoised by (resolved path, size, mtime in ns) in ``~/.cache/barnfast/file-sha256.json``
(``BARNFAST_HASH_CACHE`` moves it), so later runs and every backbone of a sweep read it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from barnfast import __version__
from barnfast.errors import ConfigError

# Recipe fields that change neither the samples, their order, the model nor the numbers computed.
NOT_DEFINING = frozenset({
    "output_dir", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "data.num_workers",
    "data.vision_cache_batch", "data.max_skip_fraction", "data.synthetic_dir", "train.report_to", "train.report_dir",
    "train.report_group",
    # replaced by the identity of what they point at (identity.*, data.<stage>.*)
    "model.model_path", "model.vision_path", "data.stage1_data", "data.stage2_data", "data.image_root",
    "data.exclude_samples",
})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".tiktoken")


class FingerprintMismatchError(ConfigError):
    """A run folder (run.json or a checkpoint) holds a run with another fingerprint."""


def _hash_cache_path() -> Path:
    return Path(os.environ.get("BARNFAST_HASH_CACHE") or Path.home() / ".cache" / "barnfast" / "file-sha256.json")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised by (resolved path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache = _hash_cache_path()
    try:
        memo = json.loads(cache.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo[memo_key] = digest
    try:  # best effort: a read-only home only costs the next run another read
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(cache)
    except OSError:
        pass
    return digest


def weights_identity(path: str | Path) -> str:
    """``sha256:<hex>`` over the (relative name, sha256) of every weight / config / tokenizer file of a
    local folder (or of one file), so that replacing the weights at the same path changes it."""
    path = Path(path)
    if path.is_file():
        return f"sha256:{file_sha256(path)}"
    if not path.is_dir():
        raise FileNotFoundError(f"weights folder {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path} holds no weight or config files ({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def _entry_hash(entry) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(entry), sort_keys=True, default=str).encode()).hexdigest()[:16]


def tiny_identity(entry, seed: int) -> str:
    """What random-init weights depend on: the registry entry, the seed, and the code that draws them."""
    import torch
    import transformers

    return (f"random-init seed {seed}; entry {_entry_hash(entry)}; torch {torch.__version__}; "
            f"transformers {transformers.__version__}")


def model_identity(entry, path: str | None, seed: int) -> str:
    """Identity of a backbone or vision tower's weights: local folder content, tiny seed, or hub id."""
    if path is not None:
        return weights_identity(path)
    if entry.tiny:
        return tiny_identity(entry, seed)
    return f"hub {entry.hf_id} (revision not pinned)"


def flatten_recipe(recipe: dict) -> dict:
    """Dotted keys of a resolved recipe dict; stages are keyed by name, lists stay values."""
    out = {}
    for section, values in recipe.items():
        if section == "stages":
            for stage in values:
                out.update({f"stages[{stage['name']}].{k}": v for k, v in stage.items() if k != "name"})
            out["stages"] = [s["name"] for s in values]
        elif isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    digest: str  # sha256 hex of the canonical JSON of ``fields``
    fields: dict

    @classmethod
    def of(cls, fields: dict) -> Fingerprint:
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
        return cls(hashlib.sha256(canonical.encode()).hexdigest(), json.loads(canonical))


def compute(recipe, *, backbone, vision, stage_files: dict[str, tuple[Path, Path, bool]],
            exclude_file: str | Path | None = None) -> Fingerprint:
    """The fingerprint of ``recipe`` (a :class:`barnfast.config.Recipe`).

    ``backbone`` / ``vision``: the registry entries the run uses; ``stage_files``: stage name →
    (data file, image root, whether it is the built-in synthetic set); ``exclude_file``: the sweep's
    list of samples dropped for every backbone.
    """
    flat = flatten_recipe(recipe.to_dict())
    fields = {k: v for k, v in flat.items() if k not in NOT_DEFINING}
    fields["data.vision_cache"] = bool(recipe.data.vision_cache)
    seed = recipe.train.seed
    fields["identity.backbone"] = f"{backbone.name}: {model_identity(backbone, recipe.model.model_path, seed)}"
    fields["identity.vision"] = f"{vision.name}: {model_identity(vision, recipe.model.vision_path, seed)}"
    for stage, (path, image_root, synthetic) in stage_files.items():
        fields[f"data.{stage}.file_sha256"] = file_sha256(path)
        fields[f"data.{stage}.images"] = "synthetic (generated from the data.synthetic_* fields)" if synthetic \
            else str(Path(image_root).resolve())
    if exclude_file:
        fields["data.exclude_samples_sha256"] = file_sha256(exclude_file)
    fields["barnfast.version"] = __version__
    return Fingerprint.of(fields)


def differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, old, new) for every field whose value differs (a missing field reads as None)."""
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def describe(diffs: list[tuple[str, object, object]], limit: int = 40) -> str:
    lines = [f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"  ... and {len(diffs) - limit} more")
    return "\n".join(lines)


def read_recorded(run_dir: str | Path) -> tuple[str | None, dict] | None:
    """(fingerprint, fields) recorded in ``run_dir/run.json``; None when there is no run.json."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record.get("fingerprint"), record.get("fingerprint_fields") or {}


def check_run_folder(run_dir: str | Path, fp: Fingerprint, *, what: str = "this run") -> None:
    """Refuse a folder whose ``run.json`` records another run: raise listing each differing field."""
    recorded = read_recorded(run_dir)
    if recorded is None:
        return
    digest, fields = recorded
    if digest == fp.digest:
        return
    diffs = differences(fields, fp.fields) if fields else [("fingerprint", digest, fp.digest)]
    raise FingerprintMismatchError(
        f"{Path(run_dir) / 'run.json'} records a different run than {what} "
        f"(fingerprint {str(digest)[:12]} -> {fp.digest[:12]}); differing fields (old -> new):\n{describe(diffs)}\n"
        f"Use another --output-dir, or remove {run_dir} to train it again.")


def check_checkpoint(state_fingerprint: str | None, checkpoint_path: str | Path, fp: Fingerprint) -> None:
    """Refuse to resume from a checkpoint saved under another fingerprint."""
    if state_fingerprint is not None and state_fingerprint != fp.digest:
        raise FingerprintMismatchError(
            f"checkpoint {checkpoint_path} was saved by a run with fingerprint {state_fingerprint[:12]}, not "
            f"{fp.digest[:12]} (this run's); --resume continues only the same run. Use another --output-dir.")
