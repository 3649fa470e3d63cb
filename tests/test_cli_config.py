"""``--config FILE`` / ``--set KEY=VALUE`` on train, score and evaluate, and ``dzad config show``:
one parser (:mod:`dzad.overrides`), values read as YAML 1.2, each bad key or value one line."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from dzad import config
from dzad.cli import app
from dzad.config import DZADConfig
from dzad.overrides import apply_assignments, parse_assignments

runner = CliRunner()


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_values_are_read_as_yaml_1_2_like_dvc():
    got = parse_assignments(
        ["train.steps=800", "train.lr=1e-4", "runtime.compile=off", "ablation.t_starts=[250, 500]"]
    )
    assert got == {
        "train.steps": 800,
        "train.lr": 1e-4,
        "runtime.compile": "off",  # YAML 1.1 would make it False
        "ablation.t_starts": [250, 500],
    }
    cfg = apply_assignments(DZADConfig(), got)
    assert (cfg.train.steps, cfg.train.lr, cfg.runtime.compile) == (800, 1e-4, "off")
    assert cfg.ablation.t_starts == (250, 500)  # a tuple, as a params file gives it


BAD_SETS = {
    "no-equals": ("trainsteps", "trainsteps"),
    "empty-key": ("=5", "=5"),
    "twice": ("train.steps=5 train.steps=6", "train.steps: given twice"),
    "not-yaml": ("train.steps=[1,", "train.steps"),
    "unknown-key": ("train.stepz=5", "train.stepz: unknown key"),
    "unknown-section": ("trian.steps=5", "trian.steps: unknown key"),
    "whole-section": ("train=5", "train: is a section"),
    "bad-value": ("train.steps=-5", "train.steps: -5 is not allowed"),
    "bad-type": ("train.steps=abc", "train.steps: 'abc' is not allowed"),
    "bad-choice": ("runtime.compile=maybe", "runtime.compile: 'maybe'"),
}


@pytest.mark.parametrize("items, named", BAD_SETS.values(), ids=BAD_SETS.keys())
def test_a_bad_set_is_one_line_naming_the_key(items, named):
    args = [a for item in items.split() for a in ("-S", item)]
    assert named in _error_line(runner.invoke(app, ["config", "show", *args]))


def test_config_show_prints_the_file_with_the_sets_applied(tmp_path):
    params = tmp_path / "study.yaml"
    params.write_text("train: {steps: 3, lr: 0.001}\nmodel: {profile: tiny}\n")
    result = runner.invoke(app, ["config", "show", "--config", str(params), "-S", "train.lr=1e-4"])
    assert result.exit_code == 0, result.output
    shown = tmp_path / "shown.yaml"
    shown.write_text(result.stdout)
    cfg = config.load(shown)  # the printed YAML is a params file of the resolved config
    assert (cfg.train.steps, cfg.train.lr, cfg.model.profile) == (3, 1e-4, "tiny")
    assert cfg.noise == DZADConfig().noise  # unset sections keep the defaults
    assert result.stdout.startswith("study: demo\nseed: 0\n")  # params.yaml's order, not sorted


def test_train_reads_config_params_and_sets_with_one_parser(tmp_path, monkeypatch, synth_root):
    params = tmp_path / "study.yaml"
    params.write_text("train: {steps: 3, lr: 0.001}\n")
    seen = []

    def fake_train(cfg, *_a, **_k):
        seen.append(cfg)
        raise RuntimeError("stop")

    monkeypatch.setattr("dzad.training.train", fake_train)
    base = ["train", "--data", str(synth_root), "--source-categories", "weave"]
    base += ["--out", str(tmp_path / "ckpt"), "--profile", "tiny"]
    for spelling in ("--config", "--params"):  # the older spelling keeps working
        args = [*base, spelling, str(params), "-S", "train.lr=1e-4", "--set", "runtime.compile=off"]
        result = runner.invoke(app, args)
        assert isinstance(result.exception, RuntimeError), result.output
    for cfg in seen:
        assert (cfg.train.steps, cfg.train.lr, cfg.runtime.compile) == (3, 1e-4, "off")
        assert cfg.model.profile == "tiny"
    twice = runner.invoke(app, [*base, "--steps", "4", "-S", "train.steps=5"])
    assert "train.steps" in _error_line(twice) and "give it once" in _error_line(twice)
    bad = runner.invoke(app, [*base, "-S", "train.steps=0"])
    assert "train.steps: 0 is not allowed" in _error_line(bad)
    assert len(seen) == 2 and not (tmp_path / "ckpt").exists()


def _no_model(*_a, **_k):
    raise AssertionError("a refused setting must stop before the model loads")


def _refusal_args(command, tmp_path, monkeypatch, checkpoint) -> list[str]:
    """``dzad score IMAGE`` / ``dzad evaluate --data ROOT`` on ``checkpoint`` into ``out/``, with
    loading the model made an error: whatever is refused must stop before it."""
    monkeypatch.setattr(f"dzad.cli.{command}_cmds.load_model", _no_model)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    head = ["score", str(image)] if command == "score" else ["evaluate", "--data", str(tmp_path)]
    return [*head, "-m", str(checkpoint), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("command", ["score", "evaluate"])
def test_scoring_refuses_settings_the_checkpoint_fixes(
    command, tmp_path, monkeypatch, tiny_checkpoint
):
    base = _refusal_args(command, tmp_path, monkeypatch, tiny_checkpoint)
    for key in ("train.steps=5", "model.profile=demo", "detection.threshold_quantile=0.9"):
        line = _error_line(runner.invoke(app, [*base, "-S", key]))
        assert key.split("=")[0] in line and "fixed by the checkpoint" in line
    line = _error_line(runner.invoke(app, [*base, "--threads", "1", "-S", "runtime.threads=2"]))
    assert "runtime.threads" in line
    line = _error_line(runner.invoke(app, [*base, "-S", "anomaly_map.sigma=-1"]))
    assert "anomaly_map.sigma: -1 is not allowed" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["score", "evaluate"])
def test_regime_params_and_config_or_set_regime_are_refused_together(
    command, tmp_path, monkeypatch, tiny_checkpoint
):
    """Both set the regime section: one of them would silently win, so the pair stops the run."""
    base = _refusal_args(command, tmp_path, monkeypatch, tiny_checkpoint)
    params = tmp_path / "regime.yaml"
    params.write_text("regime: {dzad_weight: 0.25}\n")
    base += ["--batch-zero-shot", "--regime-params", str(params)]
    for extra in (["-S", "regime.dzad_weight=0.5"], ["--config", str(params)]):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2
        line = _error_line(result)
        assert "regime.yaml" in line and "--regime-params" in line and "use one" in line
    assert not (tmp_path / "out").exists()


def test_config_show_with_a_model_takes_the_files_scoring_settings(tmp_path, tiny_checkpoint):
    params = tmp_path / "study.yaml"
    params.write_text("anomaly_map: {sigma: 2.5}\ntrain: {steps: 999}\nruntime: {threads: 1}\n")
    base = ["config", "show", "-m", str(tiny_checkpoint), "--config", str(params)]
    result = runner.invoke(app, [*base, "-S", "evaluate.batch_size=3"])
    assert result.exit_code == 0, result.output
    shown = tmp_path / "shown.yaml"
    shown.write_text(result.stdout)
    cfg = config.load(shown)
    assert (cfg.anomaly_map.sigma, cfg.runtime.threads, cfg.evaluate.batch_size) == (2.5, 1, 3)
    assert cfg.train.steps == 30  # the checkpoint's (tests/conftest.py), not the file's 999
    assert "train.steps" in result.stderr and "fixed by the checkpoint" in result.stderr
    refused = runner.invoke(app, [*base, "--for", "score", "-S", "evaluate.batch_size=3"])
    assert "evaluate.batch_size" in _error_line(refused)


def test_score_and_evaluate_run_with_the_changed_settings(tmp_path, monkeypatch, tiny_checkpoint):
    import dzad.cli.model_options as options

    used = []

    def spy(*args):
        model = options.load_model(*args)
        used.append(model.cfg)
        return model

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (90, 20, 60)).save(image)
    args = ["-m", str(tiny_checkpoint), "--random-backbone", "--json"]
    sets = ["-S", "anomaly_map.sigma=2", "-S", "reconstruction.steps=2", "--threads", "1"]
    monkeypatch.setattr("dzad.cli.score_cmds.load_model", spy)
    plain = runner.invoke(app, ["score", str(image), *args, "--out", str(tmp_path / "a")])
    changed = runner.invoke(app, ["score", str(image), *args, *sets, "--out", str(tmp_path / "b")])
    assert plain.exit_code == 0 and changed.exit_code == 0, changed.output
    assert used[0].anomaly_map.sigma != 2.0 and used[0].reconstruction.steps != 2
    assert (used[1].anomaly_map.sigma, used[1].reconstruction.steps) == (2.0, 2)
    assert used[1].runtime.threads == 1
    scores = [json.loads(r.stdout)["rows"][0]["image_score"] for r in (plain, changed)]
    assert scores[0] != scores[1]  # the changed settings are the ones scored with


def test_evaluate_takes_its_section_from_set(tmp_path, tiny_checkpoint, synth_root):
    args = ["evaluate", "-m", str(tiny_checkpoint), "--data", str(synth_root), "--json"]
    args += ["--categories", "grain", "--out", str(tmp_path / "ev"), "--random-backbone"]
    result = runner.invoke(
        app, [*args, "-S", "evaluate.max_images=2", "-S", "evaluate.controls=no"]
    )
    assert "evaluate.controls" in _error_line(result)  # YAML 1.2: `no` is a string, not false
    result = runner.invoke(app, [*args, "-S", "evaluate.max_images=2", "--no-controls"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["counts"]["grain"]["images"] == 2 and metrics["controls"] == {}


def test_one_spelling_in_every_command():
    for command in (["train"], ["score"], ["evaluate"], ["config", "show"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 0, result.output
        assert "--config" in result.stdout and "--set" in result.stdout and "-S" in result.stdout
    assert "--params" in runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
