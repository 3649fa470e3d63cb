"""Parameters of the Prefect flows: the params YAML, the flow's overrides, the run names.

``params_file`` is parsed once per file content (:func:`dzad.config.load`); the other parameters of
the orchestrator flow ``dzad`` (:mod:`flows.pipeline`) override it (None keeps the file's value).
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


@functools.lru_cache(maxsize=16)
def _parse(path: str, digest: str) -> DZADConfig:
    return dzad_config.load(path)  # its errors name the file


def load_params(params_file: str | Path) -> DZADConfig:
    """The params YAML as a config, parsed once per (path, content)."""
    path = Path(params_file)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return _parse(str(path), digest)


def apply_overrides(
    cfg: DZADConfig,
    *,
    seed: int | None = None,
    profile: str | None = None,
    steps: int | None = None,
    device: str | None = None,
    targets: list[str] | None = None,
    weightings: list[str] | None = None,
    t_starts: list[int] | None = None,
    architecture: bool | None = None,
) -> DZADConfig:
    """``cfg`` with the flow's ``-p key=value`` overrides (``seed``: a one-seed study)."""
    if seed is not None:
        cfg = replace(cfg, seed=seed, seeds=(seed,))
    model = cfg.model if profile is None else replace(cfg.model, profile=profile)
    train = cfg.train if steps is None else replace(cfg.train, steps=steps)
    train = train if device is None else replace(train, device=device)
    sets = cfg.sets
    if targets is not None:
        unknown = sorted(set(targets) - set(sets.targets))
        if unknown:
            raise ValueError(f"targets {unknown} are not in sets.targets {sorted(sets.targets)}")
        sets = replace(sets, targets={t: sets.targets[t] for t in targets})
    abl = cfg.ablation
    if weightings is not None:
        abl = replace(abl, weightings=tuple(weightings))
    if t_starts is not None:
        abl = replace(abl, t_starts=tuple(t_starts))
    if architecture is not None:
        abl = replace(abl, architecture=architecture)
    # the overrides get the same checks as the file (a flow parameter steps=-5 fails here)
    return dzad_config.validate(replace(cfg, model=model, train=train, sets=sets, ablation=abl))


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


OVERRIDES = (
    "seed",
    "profile",
    "steps",
    "device",
    "targets",
    "weightings",
    "t_starts",
    "architecture",
)


def run_name(stage: str, cfg: DZADConfig) -> str:
    """``ablation-demo-seed0`` (``-seeds0-1-2`` for several): flow-run and MLflow run name."""
    seeds = "-".join(str(s) for s in cfg.seeds)
    return f"{stage}-{cfg.study}-seed{'s' if len(cfg.seeds) > 1 else ''}{seeds}"


def flow_run_name() -> str:
    """The orchestrator's run name; a bad params file still gets one (the flow logs why)."""
    p = flow_run.parameters
    try:
        cfg = load_params(p["params_file"])
        cfg = apply_overrides(cfg, **{k: p.get(k) for k in OVERRIDES})
    except Exception:  # the flow body raises the same error into the run's logs and state
        return f"{p['stage']}-{Path(p['params_file']).stem}-invalid"
    return run_name(p["stage"], cfg)


def stage_run_name(stage: str) -> Callable[[], str]:
    return lambda: run_name(stage, flow_run.parameters["cfg"])
