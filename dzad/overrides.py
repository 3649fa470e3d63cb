"""Overrides of a params file given on a command line or as Prefect flow parameters: one definition.

``dzad train --profile/--steps/--device/--threads`` and the flow ``dzad``'s parameters
(:mod:`flows.pipeline`) name the same settings; each is a field of :class:`Overrides`, and
:func:`apply_overrides` is the only code that writes them into a config. None keeps the file's
value. The result is checked like the file itself (:func:`dzad.config.validate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dzad.config import DZADConfig, validate


def _key(path: str) -> Any:
    return field(default=None, metadata={"key": path})


@dataclass(frozen=True)
class Overrides:
    """Each field's ``key`` is the ``section.name`` it replaces; ``seed`` and ``targets`` are
    special (below)."""

    seed: int | None = None  # a one-seed study with this seed (``seed`` and ``seeds``)
    profile: str | None = _key("model.profile")
    steps: int | None = _key("train.steps")
    device: str | None = _key("train.device")
    threads: int | None = _key("runtime.threads")
    targets: Sequence[str] | None = None  # keep these of sets.targets (each must exist)
    weightings: Sequence[str] | None = _key("ablation.weightings")
    t_starts: Sequence[int] | None = _key("ablation.t_starts")
    architecture: bool | None = _key("ablation.architecture")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Overrides:
        """The overrides among ``values`` (e.g. a flow run's parameters); other keys are ignored."""
        return cls(**{name: values.get(name) for name in cls.names()})


def _targets(cfg: DZADConfig, names: Sequence[str]) -> DZADConfig:
    unknown = sorted(set(names) - set(cfg.sets.targets))
    if unknown:
        raise ValueError(f"targets {unknown} are not in sets.targets {sorted(cfg.sets.targets)}")
    sets = replace(cfg.sets, targets={t: cfg.sets.targets[t] for t in names})
    return replace(cfg, sets=sets)


def apply_overrides(cfg: DZADConfig, overrides: Overrides) -> DZADConfig:
    """``cfg`` with every value of ``overrides`` that is not None, validated as a params file is
    (``steps=-5`` fails here with the key's name)."""
    if overrides.seed is not None:
        cfg = replace(cfg, seed=overrides.seed, seeds=(overrides.seed,))
    if overrides.targets is not None:
        cfg = _targets(cfg, overrides.targets)
    for f in dataclasses.fields(overrides):
        value = getattr(overrides, f.name)
        if "key" not in f.metadata or value is None:
            continue
        section, name = f.metadata["key"].split(".")
        value = tuple(value) if isinstance(value, list | tuple) else value  # configs hold tuples
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
    return validate(cfg)
