"""``dzad config show``: the resolved config a command would run with, printed as YAML.

The same options and the same code as the commands themselves (:mod:`dzad.overrides`): without
``--model`` the config ``dzad train`` builds (``--config`` or the defaults, ``--set`` on top); with
``--model`` the checkpoint's config with the scoring-time changes ``dzad score`` / ``evaluate``
accept (``--for``).
"""

from __future__ import annotations

import io
import sys
from enum import StrEnum
from pathlib import Path

import typer

from dzad.cli._app import MODEL_HELP, app, clean_errors, load_config
from dzad.cli.model_options import config_option, scoring_settings, set_option

config_app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


class ScoringCommand(StrEnum):
    score = "score"
    evaluate = "evaluate"


@config_app.command("show")
@clean_errors
def show_cmd(
    config: Path = config_option(),
    set_: list[str] = set_option(),
    model: str = typer.Option(
        None, "--model", "-m", help=f"{MODEL_HELP} Show its config as scoring would use it."
    ),
    for_: ScoringCommand = typer.Option(
        ScoringCommand.evaluate, "--for", help="With --model: whose scoring-time rules apply."
    ),
) -> None:
    """Print the resolved config as YAML: --config (or the defaults, or the checkpoint's with
    --model) with every --set applied and checked as a params file is."""
    from ruamel.yaml import YAML

    from dzad.config import from_dict, to_dict
    from dzad.overrides import (
        EVALUATE_KEYS,
        SCORING_KEYS,
        apply_assignments,
        parse_assignments,
    )

    if model is None:
        cfg = apply_assignments(load_config(config), parse_assignments(set_))
    else:
        from dzad.checkpoint import read_meta
        from dzad.cli.model_options import resolve_model

        allowed = SCORING_KEYS if for_ is ScoringCommand.score else EVALUATE_KEYS
        changes = scoring_settings(model, config, set_, {}, allowed, quiet=False)
        cfg = from_dict(read_meta(resolve_model(model))["config"])
        cfg = apply_assignments(cfg, changes)
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # the dataclasses' order, as params.yaml
    text = io.StringIO()
    yaml.dump(to_dict(cfg), text)
    sys.stdout.write(text.getvalue())
