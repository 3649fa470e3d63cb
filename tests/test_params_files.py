"""Every shipped params file survives the rewrites DVC makes (`dvc exp run -S`)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from dzad.config import flatten, load

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "studies").glob("*.yaml"))]


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_dvc_set_param_rewrite_keeps_every_value(path, tmp_path):
    """DVC's own `-S` rewrite (quotes dropped) then our loader: only the set value changed."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / path.name
    shutil.copy(path, copy)
    apply_overrides(copy, ["train.steps=30"])
    before = load(path)
    expected = dataclasses.replace(before, train=dataclasses.replace(before.train, steps=30))
    assert flatten(load(copy)) == flatten(expected)


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_every_quoted_value_reads_the_same_unquoted(path, tmp_path):
    """Any rewriter may drop quotes (DVC does): every quoted scalar, unquoted, loads the same."""
    text = path.read_text()
    plain = re.sub(r"""(:|-)\s+(['"])([^'"\n]*)\2[ \t]*$""", r"\1 \3", text, flags=re.M)
    copy = tmp_path / path.name
    copy.write_text(plain)
    assert flatten(load(copy)) == flatten(load(path))
