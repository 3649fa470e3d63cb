"""A training run's records: per-step ``train/<metric>`` curves, parameters, provenance tags,
totals and the checkpoint as artifacts."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from dzad.config import DZADConfig, TrackingConfig
from flows.tracking.runs import (
    batched,
    client,
    log_metrics,
    log_params,
    run_id,
    set_tags,
    tracking_config,
)

CHECKPOINT_ARTIFACT = "checkpoint"  # the training run's artifact folder of the checkpoint


@dataclass
class TrainingLogger:
    """``dzad.training.train`` callback: per-step ``train/<metric>`` (loss, lr, images_per_s, ...).

    Steps are buffered and written every ``flush_every`` steps and at every checkpoint (the last one
    included), so the store sees one write per batch of steps, not per step.
    """

    client: MlflowClient
    run_id: str
    flush_every: int = 10
    buffer: list[Metric] = field(default_factory=list)

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        ts = int(time.time() * 1000)
        self.buffer += [Metric(f"train/{k}", float(v), ts, step) for k, v in metrics.items()]
        if step % max(1, self.flush_every) == 0:
            self.flush()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.flush()
        tags = [
            RunTag("dzad.checkpoint_step", str(step)),
            RunTag("dzad.checkpoint_path", str(path)),
        ]
        self.client.log_batch(self.run_id, tags=tags)

    def flush(self) -> None:
        for chunk in batched(self.buffer, 1000):
            self.client.log_batch(self.run_id, metrics=list(chunk))
        self.buffer = []


def training_callbacks(run: Any, cfg: DZADConfig | TrackingConfig | None = None) -> list[Any]:
    """Callbacks for ``train(..., callbacks=...)`` that log the loss curve and images/s per step."""
    every = tracking_config(cfg).flush_every if cfg is not None else TrackingConfig.flush_every
    return [TrainingLogger(client(cfg), run_id(run), every)]


def log_checkpoint(run: Any, cfg: DZADConfig, ckpt_dir: Path) -> None:
    """The checkpoint folder as artifacts under ``checkpoint/`` (``train_state/`` only if asked)."""
    from dzad.checkpoint import TRAIN_STATE

    c, rid = client(cfg), run_id(run)
    for part in sorted(Path(ckpt_dir).iterdir()):
        if part.name == TRAIN_STATE and not cfg.tracking.log_train_state:
            continue
        if part.is_dir():
            c.log_artifacts(rid, str(part), f"{CHECKPOINT_ARTIFACT}/{part.name}")
        else:
            c.log_artifact(rid, str(part), CHECKPOINT_ARTIFACT)


def data_tags(record: Mapping[str, Any] | None) -> dict[str, str]:
    """The checkpoint's training-data record as ``dzad.data.*`` tags (runs and model versions)."""
    from dzad.training_data import describe

    if not record:
        return {"dzad.data": describe(None)}
    return {
        "dzad.data": describe(record),
        "dzad.data.roots": ", ".join(record["roots"]),
        "dzad.data.categories": ", ".join(record["categories"]),
        "dzad.data.images": str(record["images"]),
        "dzad.data.manifest_sha256": record["manifest_sha256"],
    }


def log_training(
    run: Any,
    cfg: DZADConfig,
    ckpt_dir: Path,
    manifest_hashes: Mapping[str, str],
    *,
    result: Any = None,
) -> None:
    """Params, provenance, dataset manifest hashes, the checkpoint and (``result``: TrainResult)
    its totals. Raises :class:`~dzad.errors.CheckpointError` for a folder that is no checkpoint."""
    from dzad.checkpoint import read_meta

    meta = read_meta(ckpt_dir)
    log_params(run, cfg)
    train = meta.get("train") or {}
    tags = {f"dzad.train.{k}": v for k, v in train.items()}
    tags.update({f"dzad.manifest.{name}": sha for name, sha in manifest_hashes.items()})
    tags.update(data_tags(meta.get("data")))
    set_tags(run, cfg, tags)
    client(cfg).log_dict(run_id(run), dict(manifest_hashes), "data/manifests.json")
    if meta.get("data"):
        client(cfg).log_dict(run_id(run), meta["data"], "data/training_data.json")
    if result is not None:
        totals = {
            "train/seconds": result.seconds,
            "train/images_per_s_mean": result.images_per_second,
            "train/final_loss": result.losses[-1] if result.losses else math.nan,
        }
        log_metrics(run, cfg, totals, step=result.steps)
    log_checkpoint(run, cfg, ckpt_dir)
