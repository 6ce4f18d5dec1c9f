"""What a run records next to its results: resolved config, package versions, git revision, devices."""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from barnfast import __version__, optional

PACKAGES = ("torch", "triton", "transformers", "tokenizers", "liger_kernel", "flash_attn", "peft", "numpy")


def package_versions() -> dict[str, str | None]:
    out = {"barnfast": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - not installed or no version attribute
            out[name] = None
    return out


def git_revision() -> str | None:
    """The barnfast source checkout's commit (with ``-dirty`` if it has local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout, or git missing
        return None


def write_run_record(path: str | Path, config: dict, world_size: int, device: torch.device,
                     fingerprint=None) -> dict:
    """``run.json``; ``fingerprint`` (a :class:`barnfast.training.fingerprint.Fingerprint`) and its fields
    are what a later resume or sweep compares against (a folder with another one is refused before this)."""
    record = {
        "fingerprint": None if fingerprint is None else fingerprint.digest,
        "fingerprint_fields": None if fingerprint is None else fingerprint.fields,
        "config": config,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "argv": sys.argv,
        "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "optional": optional.summary(),
    }
    Path(path).write_text(json.dumps(record, indent=2, default=str))
    return record
