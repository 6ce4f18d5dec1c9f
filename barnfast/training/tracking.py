"""Experiment tracking (optional extra ``tracking``): ``--report-to tensorboard,wandb``.

Each logged optimizer step goes to every tracker named in ``train.report_to`` as scalars
``<stage>/<metric>`` (loss, loss in bits per byte, lr, grad norm, tokens/s, samples/s, padding
efficiency), with the samples seen so far as the x-axis: it grows across stages and across a resume,
so curves of backbones with other vocabularies (other step times) line up by data seen.

- ``tensorboard``: event files under ``train.report_dir`` (default ``<output_dir>/tensorboard``); a
  sweep points every run at ``<sweep>/tensorboard/<run>``, so ``tensorboard --logdir <sweep>/tensorboard``
  shows the runs of one sweep together.
- ``wandb``: one W&B run per barnfast run, ``group`` = ``train.report_group`` (the sweep's folder name),
  ``name`` = the run folder's name, config = the resolved recipe; files under ``<output_dir>/wandb``.
  ``WANDB_MODE=offline`` keeps everything local (``wandb sync`` uploads later).

Trackers never decide anything: they are not in the run fingerprint, and a missing package is an
error at start (naming the extra), not in the middle of a run.
"""

from __future__ import annotations

import os
from pathlib import Path

TRACKERS = ("tensorboard", "wandb")
SCALARS = ("loss", "loss_bits_per_byte", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "padding_efficiency")


class Tracker:
    """Fan-out of step records to the chosen backends (rank 0 only)."""

    def __init__(self, kinds, *, output_dir: str | Path, report_dir: str | Path | None, group: str | None,
                 config: dict):
        unknown = [k for k in kinds if k not in TRACKERS]
        if unknown:
            raise ValueError(f"train.report_to: unknown tracker(s) {unknown}; known: {', '.join(TRACKERS)}")
        out = Path(output_dir)
        self._tb = None
        self._wandb = None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("--report-to tensorboard needs the tensorboard package: "
                                  "pip install 'barnfast[tracking]'") from exc
            self._tb = SummaryWriter(log_dir=str(Path(report_dir) if report_dir else out / "tensorboard"))
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("--report-to wandb needs the wandb package: "
                                  "pip install 'barnfast[tracking]'") from exc
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "barnfast"), group=group,
                                     name=out.name, dir=str(out), config=config, reinit="finish_previous")

    def log(self, rec: dict) -> None:
        step = int(rec["samples_seen"])
        values = {f"{rec['stage']}/{k}": float(rec[k]) for k in SCALARS if rec.get(k) is not None}
        if self._tb is not None:
            for tag, v in values.items():
                self._tb.add_scalar(tag, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
