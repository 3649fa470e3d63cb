"""The ``dzad`` command: the library's CLI (:mod:`dzad.cli`) plus what needs the tracking edge.

Adds the registry commands ``dzad promote`` and ``dzad models`` (MLflow, imported lazily) and plugs
the MLflow registry in as the resolver of ``models:/<name>@<alias>`` for ``--model``. The store is
``tracking.tracking_uri`` of ``--params`` (default ``sqlite:///mlflow.db``) unless
``MLFLOW_TRACKING_URI`` is set. The library itself (``python -m dzad``, the DVC stages) never
imports this module.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dzad.cli import app
from dzad.cli._app import MODEL_RESOLVERS, clean_errors, load_config
from flows import telemetry_off


def _registry_checkpoint(uri: str) -> Path:
    from flows.tracking.registry import resolve_model  # lazy: MLflow only when a URI needs it

    return resolve_model(uri)


MODEL_RESOLVERS["models:/"] = _registry_checkpoint


@app.callback()
def _edge() -> None:
    # before any command: the registry commands and models:/ URIs import MLflow (lazily)
    telemetry_off()


_PARAMS_HELP = "Study params (tracking section, targets); default ./params.yaml if present."


def _config(params: Path | None):
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    return load_config(params)


def _number(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4f}"


@app.command("promote")
@clean_errors
def promote_cmd(
    version: str = typer.Argument(..., help="Registered model version number."),
    force: bool = typer.Option(False, "--force", help="Make it champion even if it is worse."),
    params: Path | None = typer.Option(None, help=_PARAMS_HELP),
) -> None:
    """Move the 'champion' alias to VERSION when its cross-dataset mean image and pixel AUROCs are
    not worse than the current champion's by more than tracking.tolerance; exit 1 when refused."""
    from flows.tracking.promotion import promote

    result = promote(version, _config(params), force=force)
    for metric, value in result["candidate"].items():
        champ = (result["champion"] or {}).get(metric)
        typer.echo(
            f"{metric}: version {result['version']} {_number(value)}, champion {_number(champ)}"
        )
    typer.echo(f"{result['decision']}: {result['reason']}")
    if not result["promoted"]:
        raise typer.Exit(code=1)


@app.command("models")
@clean_errors
def models_cmd(params: Path | None = typer.Option(None, help=_PARAMS_HELP)) -> None:
    """List the registered model's versions, newest first, with aliases and promotion tags."""
    from flows.tracking.registry import list_versions

    cfg = _config(params)
    rows = list_versions(cfg)
    if not rows:
        typer.echo(f"no registered model {cfg.tracking.model_name!r}")
        return
    metrics = cfg.tracking.promotion_metrics
    typer.echo("\t".join(["version", "aliases", "decision", *metrics, "run_id", "trained_on"]))
    for r in rows:
        tags = r["tags"]
        cells = [tags.get(f"dzad.promotion.{m}", "-") for m in metrics]
        decision = tags.get("dzad.promotion.decision", "-")
        aliases = ",".join(r["aliases"]) or "-"
        data = tags.get("dzad.data", "-")
        typer.echo("\t".join([r["version"], aliases, decision, *cells, r["run_id"] or "-", data]))


__all__ = ["app"]
