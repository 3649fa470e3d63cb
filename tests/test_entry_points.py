"""The edge's entry points: telemetry is turned off by them, not by importing ``flows``; the
command-line and flow overrides are one definition (:mod:`dzad.overrides`)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dzad.config import DZADConfig
from dzad.overrides import Overrides, apply_overrides
from flows import QUIET, TELEMETRY_OFF

REPO = Path(__file__).resolve().parents[1]
SWITCHES = sorted({**TELEMETRY_OFF, **QUIET})


def _env_after(code: str, **preset: str) -> dict[str, str | None]:
    """The telemetry variables in a fresh interpreter (none set, but ``preset``) after ``code``."""
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(preset, PYTHONPATH=str(REPO))
    probe = (
        f"import json, os\n{code}\nprint(json.dumps({{k: os.environ.get(k) for k in {SWITCHES}}}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # three fresh interpreters importing Prefect and MLflow: ~30 s on 2 busy cores
def test_importing_flows_changes_no_environment_the_entry_points_do():
    imported = _env_after("import flows, flows.cli, flows.serve, flows.register, flows.pipeline")
    assert imported == dict.fromkeys(SWITCHES)
    via_cli = _env_after(
        "from typer.testing import CliRunner\nfrom flows.cli import app\n"
        "assert CliRunner().invoke(app, ['models', '--help']).exit_code == 0"
    )
    assert via_cli == {**TELEMETRY_OFF, **QUIET}
    via_register = _env_after(
        "from flows.register import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        DO_NOT_TRACK="false",
    )
    assert via_register == {**TELEMETRY_OFF, **QUIET, "DO_NOT_TRACK": "false"}  # user's choice


def test_overrides_write_each_key_and_keep_the_rest():
    cfg = DZADConfig()
    given = Overrides(seed=7, profile="tiny", steps=5, device="cpu", threads=2)
    out = apply_overrides(cfg, Overrides(weightings=["snr"], t_starts=[], architecture=True))
    assert (out.ablation.weightings, out.ablation.t_starts, out.ablation.architecture) == (
        ("snr",),
        (),
        True,
    )
    out = apply_overrides(cfg, given)
    assert (out.seed, out.seeds, out.model.profile) == (7, (7,), "tiny")
    assert (out.train.steps, out.train.device, out.runtime.threads) == (5, "cpu", 2)
    assert out.train.batch_size == cfg.train.batch_size and out.sets == cfg.sets
    assert apply_overrides(cfg, Overrides()) == cfg
    with pytest.raises(ValueError, match=r"train\.steps"):
        apply_overrides(cfg, Overrides(steps=-5))


def test_overrides_from_a_mapping_take_only_their_fields():
    got = Overrides.from_mapping({"stage": "train", "steps": 3, "targets": ["objects"]})
    assert got == Overrides(steps=3, targets=["objects"])


def test_every_flow_override_parameter_is_an_overrides_field():
    from flows.pipeline import dzad

    params = set(inspect.signature(dzad.fn).parameters)
    assert set(Overrides.names()) - {"threads"} <= params  # threads: a per-process CLI setting
