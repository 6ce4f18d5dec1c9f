"""Checkpoints that survive crashes, and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    stage1-step000012/            one checkpoint (a finished, renamed directory)
        .metadata, __*.distcp     trainable parameters and the optimizer's tensors (torch.distributed.checkpoint;
                                  sharded under FSDP, each rank writes its own shards)
        optimizer_extra.json      the optimizer's non-tensor state (param groups: lr, betas, ...), as JSON
        rng_rank<r>.pt            each rank's RNG states (python, numpy, torch CPU, CUDA) as tensors and ints only
        trainer_state.json        stage, step (optimizer steps done in the stage), samples seen, ...
        MANIFEST.json             sha256 and size of every other file, written after them
        COMPLETE                  written last, before the rename
    latest                        name of the newest complete checkpoint (replaced atomically)

Writes are atomic: everything goes to ``.tmp-<name>/`` first; only when every rank has written
and ``COMPLETE`` exists is the directory renamed to its final name (``os.rename`` within one
filesystem is atomic) and ``latest`` replaced (``os.replace``). A crash at any moment leaves the
previous checkpoint intact and ``latest`` pointing at it; a stale ``.tmp-*`` is ignored and removed
by the next save. A full disk during a save removes the partial folder and raises
:class:`CheckpointDiskFullError`; a missing ``latest`` is rebuilt from the newest complete checkpoint.

Nothing barnfast writes is a pickle: RNG states are tensors and ints read back with
``torch.load(weights_only=True)``, every other non-tensor value is JSON, and the DCP payload holds
tensors only (so torch's reader never unpickles a value). Before anything is loaded, every file is
checked against ``MANIFEST.json`` (a flipped byte or a truncation is an error naming the file).
torch's DCP reader still unpickles its own ``.metadata`` index: a checkpoint folder is trusted input.

Only parameters that require grad are saved (stage 1: the projector; stage 2: projector + LLM, or
the LoRA adapters): frozen weights are rebuilt bit-identically from the seed or the checkpoint
folder they came from. The learning rate is a pure function of the step and the data order a pure
function of the seed, so (parameters, optimizer state, step, RNG states) is all that exact resume
needs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from barnfast.training import distributed

LATEST = "latest"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
OPTIM_EXTRA = "optimizer_extra.json"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading sets the trainable parameters only; dcp.load itself fails if the checkpoint lacks any of them.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
_HASH_CHUNK = 8 << 20  # 8 MiB reads: few syscalls, bounded memory; sha256 itself is the cost (see _write_manifest)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or read: the message names the file and what is wrong."""


class CheckpointDiskFullError(CheckpointError):
    """The disk filled up during a save; the partial folder was removed, the previous checkpoint is intact."""


@dataclass
class TrainerState:
    stage: str  # the stage this checkpoint belongs to
    step: int  # optimizer steps completed in that stage
    stage_done: bool  # True for the end-of-stage checkpoint
    samples_seen: int
    nonfinite_in_a_row: int = 0
    # [sample id, reason, step] of samples whose image failed to decode in the loader so far in the stage
    skipped_in_loader: list = field(default_factory=list)
    fingerprint: str | None = None  # the run's (barnfast.training.fingerprint); resume refuses another


# -- RNG states as tensors and plain numbers (loadable with weights_only=True) ----------------------
def _rng_state() -> dict:
    version, mt, gauss_next = random.getstate()  # mt: 625 ints < 2**32 (624 words + the position)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- tensors to DCP, everything else to JSON ---------------------------------------------------------
def _split(tree: dict, path: str = "") -> tuple[dict, dict]:
    """(the tensors of a nested dict, in the same nesting; every other leaf as ``{"a/b/c": value}``).

    DCP stores a non-tensor value as a pickle and reads it with ``torch.load(weights_only=False)``;
    keeping those values out of its payload means torch never unpickles anything barnfast wrote.
    """
    tensors, extra = {}, {}
    for key, value in tree.items():
        where = f"{path}/{key}" if path else str(key)
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict):
            sub_t, sub_e = _split(value, where)
            tensors[key] = sub_t
            extra.update(sub_e)
        else:
            try:
                json.dumps(value)
            except TypeError as exc:
                raise CheckpointError(f"checkpoint: state entry {where} is a {type(value).__name__}, neither a "
                                      f"tensor nor JSON") from exc
            extra[where] = value
    return tensors, extra


def _merge(tree: dict, extra: dict) -> None:
    """Put the JSON leaves of :func:`_split` back into ``tree`` (tuples stay tuples where ``tree`` had them)."""
    for where, value in extra.items():
        *parents, leaf = where.split("/")
        node = tree
        for key in parents:
            if key not in node:  # an int key of a param group list, or an int FQN index: keys are strings in JSON
                key = next((k for k in node if str(k) == key), key)
            node = node.setdefault(key, {})
        old_key = next((k for k in node if str(k) == leaf), leaf)
        if isinstance(node.get(old_key), tuple):
            value = tuple(value)
        node[old_key] = value


def _optim_to_tree(osd: dict) -> dict:
    """Optimizer state dict with its ``param_groups`` list as a dict keyed by index (so paths are strings)."""
    return {**osd, "param_groups": {str(i): g for i, g in enumerate(osd.get("param_groups", []))}}


def _tree_to_optim(tree: dict) -> dict:
    groups = tree.get("param_groups", {})
    out = {**tree, "param_groups": [groups[k] for k in sorted(groups, key=int)]}
    for g in out["param_groups"]:
        if isinstance(g.get("params"), tuple):
            g["params"] = list(g["params"])
    return out


# -- the checksum manifest -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _hashed_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, COMPLETE)
                  and not p.name.startswith(".manifest-rank"))


def _write_manifest(folder: Path, info: distributed.DistInfo) -> None:
    """Every rank hashes every ``world_size``-th file; rank 0 merges the parts into ``MANIFEST.json``.

    A 7B full fine-tune saves ~84 GB (fp32 weights and two Adam moments, 12 bytes per parameter); sha256
    runs at 0.2-2 GB/s per core (0.22 GiB/s measured on a loaded 2-core CI machine, more with SHA
    extensions), so one rank alone would take minutes. Checkpoints of small shards hash in milliseconds."""
    names = _hashed_files(folder)
    mine = {n: {"sha256": _sha256(folder / n), "bytes": (folder / n).stat().st_size}
            for n in names[info.rank::info.world_size]}
    (folder / f".manifest-rank{info.rank}.json").write_text(json.dumps(mine))
    distributed.barrier(info)
    if info.is_main:
        merged = {}
        for r in range(info.world_size):
            part = folder / f".manifest-rank{r}.json"
            merged.update(json.loads(part.read_text()))
            part.unlink()
        missing = sorted(set(names) - set(merged))
        if missing:
            raise CheckpointError(f"{folder}: files {missing} were not hashed by any rank")
        _write_synced(folder / MANIFEST, json.dumps({"algorithm": "sha256", "files": merged}, indent=1,
                                                    sort_keys=True))


def _read_manifest(path: Path) -> dict:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{manifest} is missing: {path} was not written by this version of barnfast (or was "
                              f"changed by hand); refusing to load it")
    try:
        return json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest} is not a valid manifest: {exc}") from exc


def _check_file(path: Path, name: str, entry: dict) -> str | None:
    """None when ``path/name`` matches its manifest entry, else what is wrong with it."""
    f = path / name
    if not f.is_file():
        return f"{f} is missing"
    size = f.stat().st_size
    if size != entry["bytes"]:
        return f"{f} has {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
    if _sha256(f) != entry["sha256"]:
        return f"{f} does not match its sha256 in {path / MANIFEST} (corrupted: flipped bytes or edited)"
    return None


def verify_checkpoint(path: str | Path, info: distributed.DistInfo) -> None:
    """Check every file of a checkpoint against its manifest before anything is read from it.

    Each rank checks every ``world_size``-th file and the ranks agree on the result, so that all of
    them raise (no rank is left waiting in ``dcp.load``). Raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    files = _read_manifest(path)
    names = sorted(files)
    problems = [p for n in names[info.rank::info.world_size] if (p := _check_file(path, n, files[n]))]
    extra = sorted(set(_hashed_files(path)) - set(files))
    if info.is_main and extra:
        problems.append(f"{path} holds files that the manifest does not list: {extra}")
    bad = torch.tensor([float(len(problems))], device=info.device)
    if distributed.all_reduce_sum(bad, info).item() > 0:
        raise CheckpointError("checkpoint failed its checksum check, not loaded: " + (
            "; ".join(problems) if problems else f"a file of {path} checked by another rank (see its log)")
            + ". Resume from an older checkpoint: write its folder name into " + str(path.parent / LATEST))


# -- saving -------------------------------------------------------------------------------------------
def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _single_process_quiet(info: distributed.DistInfo):
    """One process is a supported case of torch.distributed.checkpoint, not a warning at every save."""
    with warnings.catch_warnings():
        if not info.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-step{step:06d}"


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python, or what torch's zip writer says when a write comes up short on a full disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "No space left" in text
                                              or "file write failed" in text)


def save_checkpoint(root: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainerState, info: distributed.DistInfo, keep: int = 2) -> Path:
    """Write one checkpoint atomically (all ranks call this) and keep the newest ``keep``.

    A full disk raises :class:`CheckpointDiskFullError` after the partial folder is removed.
    """
    root = Path(root)
    name = checkpoint_name(state.stage, state.step)
    tmp, final = root / f".tmp-{name}", root / name
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier(info)
    try:
        _write_files(tmp, model, optimizer, state, info)
    except (OSError, RuntimeError) as exc:
        if not _is_disk_full(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        previous = root / LATEST
        kept = f"the previous checkpoint {previous.read_text().strip()} is intact" if previous.exists() \
            else "there was no earlier checkpoint"
        raise CheckpointDiskFullError(
            f"disk full while saving checkpoint {name} under {root} ({free / 1e9:.2f} GB free): the partial folder "
            f"{tmp.name} was removed and {kept}. Free space (or lower train.keep_checkpoints), then --resume"
        ) from exc
    if info.is_main:
        _finalize(tmp, final, root)
        _prune(root, keep)
    distributed.barrier(info)
    return final


def _write_files(tmp: Path, model, optimizer, state: TrainerState, info: distributed.DistInfo) -> None:
    payload = {"model": get_model_state_dict(model, options=_OPTIONS)}
    extra: dict = {}
    if optimizer is not None:
        payload["optim"], extra = _split(_optim_to_tree(get_optimizer_state_dict(model, optimizer, options=_OPTIONS)))
    payload, model_extra = _split(payload)
    if model_extra:
        raise CheckpointError(f"checkpoint: non-tensor model state entries {sorted(model_extra)}")
    with _single_process_quiet(info):
        dcp.save(payload, checkpoint_id=tmp, no_dist=not info.enabled)  # collective: raises on every rank
    failure = None
    try:
        torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
        if info.is_main:
            if optimizer is not None:
                _write_synced(tmp / OPTIM_EXTRA, json.dumps(extra, indent=1))
            _write_synced(tmp / "trainer_state.json", json.dumps(asdict(state), indent=2))
    except (OSError, RuntimeError) as exc:
        failure = exc
    # Every rank learns whether a rank's own writes failed, so all raise together (none waits in a barrier).
    failed = torch.tensor([0.0 if failure is None else 1.0], device=info.device)
    if distributed.all_reduce_sum(failed, info).item() > 0:
        raise failure or OSError(errno.ENOSPC if shutil.disk_usage(tmp).free == 0 else errno.EIO,
                                 f"a write into {tmp} failed on another rank (see its log)")
    _write_manifest(tmp, info)
    if info.is_main:
        _write_synced(tmp / COMPLETE, "ok\n")


def _finalize(tmp: Path, final: Path, root: Path) -> None:
    """Rename the finished directory into place, then point ``latest`` at it (both atomic)."""
    if final.exists():  # a checkpoint of the same step from an earlier, resumed attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _point_latest(root, final.name)


def _point_latest(root: Path, name: str) -> None:
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)


def _complete(root: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first. Names sort in progress order (stage1 < stage2, zero-padded steps)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / COMPLETE).exists())


def _prune(root: Path, keep: int) -> None:
    latest = (root / LATEST).read_text().strip()
    done = _complete(root)
    for old in done[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None when there is none.

    ``latest`` missing (deleted, or lost with a crash) or naming a folder that is gone or incomplete:
    the pointer is rebuilt from the newest complete checkpoint, with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / COMPLETE).exists():
            return path
        why = f"{pointer} names {path.name}, which is missing or incomplete"
    else:
        why = f"{pointer} is missing"
    done = _complete(root)
    if not done:
        return None
    warnings.warn(f"{why}; rebuilt it from the newest complete checkpoint, {done[-1].name}", stacklevel=2)
    _point_latest(root, done[-1].name)
    return done[-1]


def read_state(path: str | Path) -> TrainerState:
    """The trainer state of a checkpoint, after checking ``trainer_state.json`` against the manifest."""
    path = Path(path)
    files = _read_manifest(path)
    if "trainer_state.json" not in files:
        raise CheckpointError(f"{path / MANIFEST} does not list trainer_state.json")
    problem = _check_file(path, "trainer_state.json", files["trainer_state.json"])
    if problem:
        raise CheckpointError(f"checkpoint failed its checksum check: {problem}")
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: distributed.DistInfo, restore_rng: bool = True) -> TrainerState:
    """Load parameters (and optimizer state, RNG states when given) saved by :func:`save_checkpoint`.

    Every file is checked against the manifest first. The model must have the same parameters marked
    trainable as when it was saved.
    """
    path = Path(path)
    verify_checkpoint(path, info)
    payload = {"model": get_model_state_dict(model, options=_OPTIONS)}
    if optimizer is not None:
        payload["optim"], _ = _split(_optim_to_tree(get_optimizer_state_dict(model, optimizer, options=_OPTIONS)))
    with _single_process_quiet(info):
        dcp.load(payload, checkpoint_id=path, no_dist=not info.enabled)
    set_model_state_dict(model, payload["model"], options=_LOAD_OPTIONS)
    if optimizer is not None:
        extra_file = path / OPTIM_EXTRA
        template = _optim_to_tree(get_optimizer_state_dict(model, optimizer, options=_OPTIONS))
        tree = {**template, **payload["optim"]}
        tree["param_groups"] = template["param_groups"]
        _merge(tree, json.loads(extra_file.read_text()))
        set_optimizer_state_dict(model, optimizer, _tree_to_optim(tree), options=_LOAD_OPTIONS)
    if restore_rng:
        rng = path / f"rng_rank{info.rank}.pt"
        if rng.exists():
            try:
                state = torch.load(rng, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - UnpicklingError and friends: refused content, named
                raise CheckpointError(f"{rng}: refused to load (it holds more than tensors and numbers; barnfast "
                                      f"never writes that): {type(exc).__name__}: {exc}") from exc
            _set_rng_state(state)
    return read_state(path)
