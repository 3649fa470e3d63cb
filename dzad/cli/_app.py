"""The Typer application and the one place where library errors become a clean exit."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from dzad.errors import DZADError

app = typer.Typer(
    name="dzad",
    help="DZAD: diffusion-based, prompt-free, zero-shot visual anomaly detection.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CommandT = TypeVar("CommandT", bound=Callable[..., Any])

CATEGORIES_HELP = "Categories (repeat the option or comma-separate); default: every category."
MODEL_HELP = "Checkpoint folder or MLflow registry URI models:/<name>@<alias> (or /<version>)."

# ``--model`` URI scheme -> its checkpoint folder; the tracking edge plugs the MLflow registry in
# (``flows.cli``: ``models:/``), so the library's CLI never imports it
MODEL_RESOLVERS: dict[str, Callable[[str], Path]] = {}


def split_list(values: list[str] | None) -> list[str]:
    """Values of a repeatable option that also takes comma-separated lists, flattened."""
    return [c.strip() for v in values or [] for c in v.split(",") if c.strip()]


# a full disk, quota, read-only file system or permission: a one-line error, not a traceback
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def clean_errors(fn: CommandT) -> CommandT:
    """Turn a :class:`DZADError` (or a ValueError, or an OSError of a full or read-only disk) into
    ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DZADError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            print(f"error: {exc.filename or 'output'}: {exc.strerror}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def load_config(params: Path | None) -> Any:
    """Parse the params YAML once, at the edge; ``None``: the defaults."""
    from dzad import config

    return config.DZADConfig() if params is None else config.load(params)
