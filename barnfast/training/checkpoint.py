"""Checkpoints that survive crashes, and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    stage1-step000012/            one checkpoint (a finished, renamed directory)
        .metadata, __*.distcp     trainable parameters and optimizer state (torch.distributed.checkpoint;
                                  sharded under FSDP, each rank writes its own shards)
        rng_rank<r>.pt            each rank's RNG states (python, numpy, torch CPU, CUDA)
        trainer_state.json        stage, step (optimizer steps done in the stage), samples seen, ...
        COMPLETE                  written last, before the rename
    latest                        name of the newest complete checkpoint (replaced atomically)

Writes are atomic: everything goes to ``.tmp-<name>/`` first; only when every rank has written
and ``COMPLETE`` exists is the directory renamed to its final name (``os.rename`` within one
filesystem is atomic) and ``latest`` replaced (``os.replace``). A crash at any moment leaves the
previous checkpoint intact and ``latest`` pointing at it; a stale ``.tmp-*`` is ignored and removed
by the next save.

Only parameters that require grad are saved (stage 1: the projector; stage 2: projector + LLM, or
the LoRA adapters): frozen weights are rebuilt bit-identically from the seed or the checkpoint
folder they came from. The learning rate is a pure function of the step and the data order a pure
function of the seed, so (parameters, optimizer state, step, RNG states) is all that exact resume
needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
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
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading sets the trainable parameters only; dcp.load itself fails if the checkpoint lacks any of them.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@dataclass
class TrainerState:
    stage: str  # the stage this checkpoint belongs to
    step: int  # optimizer steps completed in that stage
    stage_done: bool  # True for the end-of-stage checkpoint
    samples_seen: int
    nonfinite_in_a_row: int = 0
    fingerprint: str | None = None  # the run's (barnfast.training.fingerprint); resume refuses another


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _single_process_quiet(info: distributed.DistInfo):
    """One process is a supported case of torch.distributed.checkpoint, not a warning at every save."""
    with warnings.catch_warnings():
        if not info.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-step{step:06d}"


def save_checkpoint(root: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainerState, info: distributed.DistInfo, keep: int = 2) -> Path:
    """Write one checkpoint atomically (all ranks call this) and keep the newest ``keep``."""
    root = Path(root)
    name = checkpoint_name(state.stage, state.step)
    tmp, final = root / f".tmp-{name}", root / name
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier(info)
    payload = {"model": get_model_state_dict(model, options=_OPTIONS)}
    if optimizer is not None:
        payload["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    with _single_process_quiet(info):
        dcp.save(payload, checkpoint_id=tmp, no_dist=not info.enabled)
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    distributed.barrier(info)
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        (tmp / COMPLETE).write_text("ok\n")
        _finalize(tmp, final, root)
        _prune(root, keep)
    distributed.barrier(info)
    return final


def _finalize(tmp: Path, final: Path, root: Path) -> None:
    """Rename the finished directory into place, then point ``latest`` at it (both atomic)."""
    if final.exists():  # a checkpoint of the same step from an earlier, resumed attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    latest = (root / LATEST).read_text().strip()
    done = [p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).exists()]
    done.sort(key=lambda p: p.stat().st_mtime)
    for old in done[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. A pointer to an incomplete directory is an error."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / COMPLETE).exists():
        raise RuntimeError(f"{pointer} names {path.name}, which is missing or incomplete; the checkpoint folder "
                           f"was changed by hand. Remove {pointer} to start over.")
    return path


def read_state(path: str | Path) -> TrainerState:
    return TrainerState(**json.loads((Path(path) / "trainer_state.json").read_text()))


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: distributed.DistInfo, restore_rng: bool = True) -> TrainerState:
    """Load parameters (and optimizer state, RNG states when given) saved by :func:`save_checkpoint`.

    The model must have the same parameters marked trainable as when it was saved.
    """
    path = Path(path)
    payload = {"model": get_model_state_dict(model, options=_OPTIONS)}
    if optimizer is not None:
        payload["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    with _single_process_quiet(info):
        dcp.load(payload, checkpoint_id=path, no_dist=not info.enabled)
    set_model_state_dict(model, payload["model"], options=_LOAD_OPTIONS)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, payload["optim"], options=_LOAD_OPTIONS)
    if restore_rng:
        rng = path / f"rng_rank{info.rank}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
    return read_state(path)
