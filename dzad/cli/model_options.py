"""What ``dzad score`` and ``dzad evaluate`` share: the model a ``--model`` value names, the
runtime options (``--threads``, ``--compile``), the ``regime`` section, the progress bar."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dzad.cli._app import MODEL_RESOLVERS
from dzad.errors import BackboneUnavailable, DZADInputError

THREADS_HELP = "torch threads (default: the checkpoint's runtime.threads; 0 = torch's default)."
COMPILE_HELP = "auto | on | off: torch.compile the network (default: runtime.compile)."


def resolve_model(uri: str) -> Path:
    """The checkpoint folder a ``--model`` value names: a folder, or a URI of a scheme that is
    plugged into :data:`dzad.cli._app.MODEL_RESOLVERS` (``models:/`` by the ``dzad`` command)."""
    for scheme, resolve in MODEL_RESOLVERS.items():
        if uri.startswith(scheme):
            return resolve(uri)
    if uri.startswith("models:/"):
        raise DZADInputError(uri, "registry URIs need the `dzad` command (flows.cli), not -m dzad")
    return Path(uri)


def load_model(uri: str, random_backbone: bool):
    """DZAD from ``--model`` (on the GPU when there is one); a missing backbone says how to
    proceed instead of a trace."""
    from dzad.model import DZAD
    from dzad.runtime import choose_device

    device = choose_device("auto")
    try:
        return DZAD.from_checkpoint(
            resolve_model(uri), random_backbone=random_backbone, map_location=device
        )
    except BackboneUnavailable as exc:
        raise BackboneUnavailable(
            f"{exc} -- stopping; pass --random-backbone only for tests (random features)"
        ) from None


def apply_options(dzad, threads: int | None, compile_: str | None) -> None:
    """The checkpoint's ``runtime`` config with ``--threads`` / ``--compile`` on top, applied
    (thread count, compiled network) before anything is scored."""
    from dzad.config import validate
    from dzad.runtime import apply_runtime

    changes = {k: v for k, v in (("threads", threads), ("compile", compile_)) if v is not None}
    runtime = dzad.cfg.runtime  # validated when the checkpoint loaded
    if changes:  # validating the whole config costs ~3 ms, more than scoring a small image
        runtime = validate(replace(dzad.cfg, runtime=replace(runtime, **changes))).runtime
    apply_runtime(runtime, dzad)


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
    """A Rich progress bar on stderr (``disable``d when not ``enabled``) and its task."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    prog = Progress(
        f"[bold]{what}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )
    return prog, prog.add_task(what, total=total)
