"""What ``dzad score`` and ``dzad evaluate`` share: the model a ``--model`` value names, its
config's scoring-time changes (``--config``, ``--set``, ``--threads``, ``--compile``), the runtime,
the ``regime`` section, the progress bar."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from dzad.cli._app import MODEL_RESOLVERS
from dzad.errors import BackboneUnavailable, DZADInputError

THREADS_HELP = "torch threads (default: the checkpoint's runtime.threads; 0 = torch's default)."
COMPILE_HELP = "auto | on | off: torch.compile the network (default: runtime.compile)."
SET_HELP = (
    "KEY=VALUE: set one config value (dotted key, YAML value, as `dvc exp run -S`); repeat it."
)


def config_option() -> Any:
    """``--config FILE``: a params / study file (the same option in every command)."""
    return typer.Option(
        None, "--config", help="Params / study YAML file (at scoring time: its scoring settings)."
    )


def set_option() -> Any:
    """``--set KEY=VALUE`` / ``-S``, repeatable (the same option in every command)."""
    return typer.Option(None, "--set", "-S", metavar="KEY=VALUE", help=SET_HELP)


def resolve_model(uri: str) -> Path:
    """The checkpoint folder a ``--model`` value names: a folder, or a URI of a scheme that is
    plugged into :data:`dzad.cli._app.MODEL_RESOLVERS` (``models:/`` by the ``dzad`` command)."""
    for scheme, resolve in MODEL_RESOLVERS.items():
        if uri.startswith(scheme):
            return resolve(uri)
    if uri.startswith("models:/"):
        raise DZADInputError(uri, "registry URIs need the `dzad` command (flows.cli), not -m dzad")
    return Path(uri)


def scoring_settings(
    uri: str,
    config_file: Path | None,
    items: list[str] | None,
    options: Mapping[str, Any],
    allowed: tuple[str, ...],
    quiet: bool,
) -> dict[str, Any]:
    """The changes ``--config`` / ``--set`` / the named ``options`` make to the config of the
    checkpoint ``uri`` (its ``dzad.json`` only; :func:`dzad.overrides.scoring_assignments`), checked
    before the model loads. Keys of ``--config`` that the checkpoint fixes and that differ from it
    are named on stderr unless ``quiet``."""
    from dzad.checkpoint import read_meta
    from dzad.config import from_dict
    from dzad.overrides import scoring_assignments

    ckpt = from_dict(read_meta(resolve_model(uri))["config"])
    settings, fixed = scoring_assignments(ckpt, config_file, items, options, allowed)
    if fixed and not quiet:
        more = f" and {len(fixed) - 5} more" if len(fixed) > 5 else ""
        print(
            f"note: {config_file}: {', '.join(fixed[:5])}{more} fixed by the checkpoint "
            "(not applied at scoring time)",
            file=sys.stderr,
        )
    return settings


def load_model(uri: str, random_backbone: bool, settings: Mapping[str, Any] | None = None):
    """DZAD from ``--model`` (on the GPU when there is one) with ``settings`` (dotted key ->
    value, :func:`scoring_settings`) applied; a missing backbone says how to proceed instead of a
    trace."""
    from dzad.model import DZAD
    from dzad.overrides import apply_assignments
    from dzad.runtime import choose_device

    settings = settings or {}
    device = choose_device("auto")
    try:
        dzad = DZAD.from_checkpoint(
            resolve_model(uri),
            backbone_override=settings.get("anomaly_map.backbone"),  # built at load
            random_backbone=random_backbone or bool(settings.get("anomaly_map.random_backbone")),
            map_location=device,
        )
    except BackboneUnavailable as exc:
        raise BackboneUnavailable(
            f"{exc} -- stopping; pass --random-backbone only for tests (random features)"
        ) from None
    cfg = apply_assignments(dzad.cfg, settings) if settings else dzad.cfg
    return dzad if cfg == dzad.cfg else dzad.with_settings(cfg)


def apply_options(dzad) -> None:
    """Apply the model's ``runtime`` config (thread count, compiled network) before anything is
    scored; ``--threads`` / ``--compile`` are among its settings (:func:`scoring_settings`)."""
    from dzad.runtime import apply_runtime

    apply_runtime(dzad.cfg.runtime, dzad)


def check_regime_sources(
    regime_params: Path | None, config_file: Path | None, items: list[str] | None
) -> None:
    """``--regime-params`` and ``--config`` / ``--set regime.*`` both set the regime section:
    refuse the pair instead of letting one silently win."""
    if regime_params is None:
        return
    if config_file is not None or any(i.strip().startswith("regime.") for i in items or []):
        raise DZADInputError(
            regime_params, "--regime-params and --config / --set regime.* both set it: use one"
        )


def regime_config(dzad, regime_params: Path | None):
    """The checkpoint's ``regime`` section, or that of ``--regime-params`` (errors name it)."""
    if regime_params is None:
        return dzad.cfg.regime
    from dzad.config import load

    if not regime_params.is_file():
        raise DZADInputError(regime_params, "--regime-params is not a file")
    try:
        return load(regime_params).regime
    except ValueError as exc:
        raise DZADInputError(regime_params, str(exc).split(": ", 1)[-1]) from None


def progress(enabled: bool, total: int, what: str):
    """The progress display of ``total`` images on stderr (:class:`dzad.progress.Progress`: a bar
    on a terminal, periodic log lines elsewhere); nothing when not ``enabled``."""
    from dzad.progress import Progress

    return Progress(total, what, "images", enabled=enabled)
