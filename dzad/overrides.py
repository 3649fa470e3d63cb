"""Overrides of a params file given on a command line or as Prefect flow parameters: one definition.

Two spellings, one writer:

- ``--set KEY=VALUE`` (``-S``, repeatable; ``dzad train``, ``score``, ``evaluate``,
  ``config show``): a dotted key (``train.steps``, ``seed``) and a value read as YAML 1.2, as
  DVC reads ``-S`` (``800`` an int, ``1e-4`` a float, ``off`` / ``no`` strings, ``[1, 2]`` a
  list, ``null`` None): :func:`parse_assignments`;
- named options (``dzad train --profile/--steps/--device/--threads``) and the flow ``dzad``'s
  parameters (:mod:`flows.pipeline`): each a field of :class:`Overrides` with the key it replaces.

:func:`apply_assignments` is the only code that writes either into a config; the result is checked
like a params file (:func:`dzad.config.validate`), so a bad value fails with its key named. A key
given both ways is refused (:func:`with_options`). ``dzad score`` / ``evaluate`` start from the
checkpoint's config and may change only the settings that apply at scoring time
(:func:`scoring_assignments`; :data:`SCORING_KEYS`, :data:`EVALUATE_KEYS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dzad.config import DZADConfig, flatten, from_dict, load, parse_yaml, read_params, to_dict

# What ``dzad score`` may change in a checkpoint's config: how it runs, the regimes, and the
# inference settings the model checks against its calibration (other reconstruction / map
# settings than at calibration: no map threshold, fusion ranks among the scored images; the
# outputs say so). A key ending in "." names its whole section. Everything else (model, train,
# detection, the noise bank, data.image_size, ...) is fixed by the trained, calibrated checkpoint.
SCORING_KEYS = (
    "runtime.",
    "regime.",
    "anomaly_map.",
    "reconstruction.",
    "noise.max_batch",
    "noise.precision",
)
# ``dzad evaluate`` also reads its own section and how ground-truth masks are binarised
EVALUATE_KEYS = (*SCORING_KEYS, "evaluate.", "data.mask_threshold")


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

    def assignments(self) -> dict[str, Any]:
        """``{"train.steps": 800, ...}``: the keyed fields that are not None."""
        fields = [f for f in dataclasses.fields(self) if "key" in f.metadata]
        values = {f.metadata["key"]: getattr(self, f.name) for f in fields}
        return {k: v for k, v in values.items() if v is not None}


def parse_assignments(items: Sequence[str] | None) -> dict[str, Any]:
    """``["train.steps=800", "runtime.compile=off"]`` -> ``{"train.steps": 800, ...}``; each value
    read as YAML 1.2. A malformed item, an unreadable value or a key given twice is one error."""
    from ruamel.yaml import YAMLError

    values: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (e.g. train.steps=800)")
        if key in values:
            raise ValueError(f"--set {key}: given twice")
        try:
            values[key] = parse_yaml(text)
        except YAMLError:
            raise ValueError(f"--set {key}: {text!r} is not a YAML value") from None
    return values


def with_options(assignments: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``assignments`` plus the named options' ``{key: value}`` that are not None; a key given by
    both is refused (which one was meant is not guessed)."""
    given = {k: v for k, v in options.items() if v is not None}
    both = sorted(set(given) & set(assignments))
    if both:
        raise ValueError(f"--set {both[0]}: also given by its own option; give it once")
    return {**assignments, **given}


def _node(raw: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The mapping inside ``raw`` that holds the last part of dotted ``key``, and that part."""
    *parents, name = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parents):
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise ValueError(f"{key}: unknown key ({where} is not a section)")
    if name not in node:
        raise ValueError(f"{key}: unknown key; known here: {sorted(node)}")
    return node, name


def apply_assignments(cfg: DZADConfig, values: Mapping[str, Any]) -> DZADConfig:
    """``cfg`` with each dotted key of ``values`` set, validated as a params file is: an unknown
    key or a bad value fails naming the key (``params.train.steps: -5 is not allowed; ...``)."""
    raw = to_dict(cfg)
    for key, value in values.items():
        node, name = _node(raw, key)
        if node is raw and isinstance(node[name], dict):  # would reset its other keys
            raise ValueError(f"{key}: is a section; set its keys ({key}.NAME=VALUE)")
        node[name] = value
    return from_dict(raw)


def _allowed(key: str, allowed: Sequence[str]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _value(raw: dict[str, Any], key: str) -> Any:
    try:
        node, name = _node(raw, key)
    except ValueError:
        return _MISSING
    return node[name]


_MISSING = object()


def scoring_assignments(
    cfg: DZADConfig,
    config_file: Path | None,
    items: Sequence[str] | None,
    options: Mapping[str, Any],
    allowed: Sequence[str],
) -> tuple[dict[str, Any], list[str]]:
    """The changes ``dzad score`` / ``evaluate`` make to a checkpoint's config ``cfg``, and the
    keys of ``config_file`` that they leave as the checkpoint has them.

    ``config_file`` (a params / study file, validated whole): every key it sets that is
    ``allowed`` is taken; its other keys are fixed by the checkpoint and returned when their value
    differs. ``--set`` ``items`` and the named ``options`` (``{key: value or None}``) come on top;
    one of them outside ``allowed`` is refused, naming the key, and every value is checked.
    """
    given = with_options(parse_assignments(items), options)
    for key in given:
        if not _allowed(key, allowed):
            sections = ", ".join(a + "*" if a.endswith(".") else a for a in allowed)
            raise ValueError(
                f"--set {key}: fixed by the checkpoint at scoring time; this command may set "
                f"{sections}"
            )
    from_file: dict[str, Any] = {}
    differing: list[str] = []
    if config_file is not None:
        file_cfg, have = to_dict(load(config_file)), to_dict(cfg)
        for key in flatten(read_params(config_file)):
            value = _value(file_cfg, key)
            if _allowed(key, allowed):
                from_file[key] = value
            elif _value(have, key) != value:
                differing.append(key)
    changes = {**from_file, **given}
    apply_assignments(cfg, changes)  # a bad value fails here, before any model is loaded
    return changes, differing


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
    return apply_assignments(cfg, overrides.assignments())
