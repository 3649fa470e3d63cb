"""`dzad` command line: one module per command group, all registered on one Typer app."""

from dzad.cli import data_cmds, model_cmds, score_cmds, study_cmds, track_cmds  # noqa: F401
from dzad.cli._app import app

__all__ = ["app"]
