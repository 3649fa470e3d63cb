"""The library's command line (``python -m dzad``): one module per command group, all on one Typer
app. The ``dzad`` command is :mod:`flows.cli`: this app plus the registry commands."""

from dzad.cli import (  # noqa: F401
    config_cmds,
    data_cmds,
    evaluate_cmds,
    model_cmds,
    score_cmds,
    study_cmds,
)
from dzad.cli._app import app

__all__ = ["app"]
