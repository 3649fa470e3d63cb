"""Parameters of the Prefect flows: the params YAML, the flow's overrides, the run names.

``params_file`` is parsed once per file content (:func:`dzad.config.load`); the other parameters of
the orchestrator flow ``dzad`` (:mod:`flows.pipeline`) override it through
:class:`dzad.overrides.Overrides` (None keeps the file's value).
Flow runs and their MLflow runs share one name (:func:`run_name`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from prefect.runtime import flow_run

from dzad import config as dzad_config
from dzad.config import DZADConfig
from dzad.overrides import Overrides, apply_overrides


@functools.lru_cache(maxsize=16)
def _parse(path: str, digest: str) -> DZADConfig:
    return dzad_config.load(path)  # its errors name the file


def load_params(params_file: str | Path) -> DZADConfig:
    """The params YAML as a config, parsed once per (path, content)."""
    path = Path(params_file)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return _parse(str(path), digest)


DVC_RAW = Path("data/raw")  # the DVC `prepare` stage's output (dvc.yaml)


def own_data(cfg: DZADConfig, out: Path) -> DZADConfig:
    """``cfg`` with the flow's own data folders: what the DVC pipeline writes under ``data/raw``
    (synthetic data, fetched datasets, ``datasets.json``) goes to ``<out>/data/raw`` and the
    caches to ``<out>/data/cache``, so a flow run never modifies a DVC-tracked output. Roots
    outside ``data/raw`` (datasets used where they are) are kept."""
    raw = out / "data" / "raw"

    def moved(root: str) -> str:
        path = Path(root)
        return str(raw / path.relative_to(DVC_RAW)) if path.is_relative_to(DVC_RAW) else root

    sets = replace(
        cfg.sets,
        source=tuple(replace(r, root=moved(r.root)) for r in cfg.sets.source),
        targets={t: replace(r, root=moved(r.root)) for t, r in cfg.sets.targets.items()},
    )
    synth = replace(cfg.synth, dest=moved(cfg.synth.dest))
    data = replace(cfg.data, cache_dir=str(out / "data" / "cache"))
    return replace(cfg, sets=sets, synth=synth, data=data)


def run_name(stage: str, cfg: DZADConfig) -> str:
    """``ablation-demo-seed0`` (``-seeds0-1-2`` for several): flow-run and MLflow run name."""
    seeds = "-".join(str(s) for s in cfg.seeds)
    return f"{stage}-{cfg.study}-seed{'s' if len(cfg.seeds) > 1 else ''}{seeds}"


def flow_run_name() -> str:
    """The orchestrator's run name; a bad params file still gets one (the flow logs why)."""
    p = flow_run.parameters
    try:
        cfg = load_params(p["params_file"])
        cfg = apply_overrides(cfg, Overrides.from_mapping(p))
    except Exception:  # the flow body raises the same error into the run's logs and state
        return f"{p['stage']}-{Path(p['params_file']).stem}-invalid"
    return run_name(p["stage"], cfg)


def stage_run_name(stage: str) -> Callable[[], str]:
    return lambda: run_name(stage, flow_run.parameters["cfg"])
