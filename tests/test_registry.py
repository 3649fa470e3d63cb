"""Promotion by aliases (candidate -> champion by tolerance), forced promotion, the CLI, resolution.

Model versions here carry fake evaluation metrics on their source runs: promotion reads only those,
so no model needs to be trained. A temporary SQLite store per test; telemetry off.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from dzad.config import DatasetRef, DZADConfig, SetsConfig, TrackingConfig
from dzad.errors import DZADInputError

promotion = pytest.importorskip("flows.tracking.promotion")
registry = pytest.importorskip("flows.tracking.registry")
runs = pytest.importorskip("flows.tracking.runs")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An initialised empty SQLite store (creating the schema takes seconds, a copy does not)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def cfg(tmp_path, monkeypatch, empty_store) -> DZADConfig:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    targets = {"a": DatasetRef("data/a"), "b": DatasetRef("data/b")}
    return DZADConfig(
        sets=SetsConfig(targets=targets),
        tracking=TrackingConfig(tolerance=0.01, artifact_root=str(tmp_path / "mlartifacts")),
    )


def fake_version(cfg: DZADConfig, means: dict[str, tuple[float, float]]) -> str:
    """A model version whose run logged ``<t>/mean/{image,pixel}_auroc`` = ``means[t]``."""
    with runs.start_run(cfg, "fake-eval") as run:
        for target, (image, pixel) in means.items():
            runs.log_metrics(
                run,
                cfg,
                {f"{target}/mean/image_auroc": image, f"{target}/mean/pixel_auroc": pixel},
            )
    c = runs.client(cfg)
    name = cfg.tracking.model_name
    if not c.search_registered_models(f"name = '{name}'"):
        c.create_registered_model(name)
    mv = c.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version)


def champion(cfg: DZADConfig) -> str:
    return str(runs.client(cfg).get_model_version_by_alias("dzad", "champion").version)


def version_tags(cfg: DZADConfig, version: str) -> dict[str, str]:
    return runs.client(cfg).get_model_version("dzad", version).tags


def test_telemetry_is_off():
    from mlflow.telemetry.utils import is_telemetry_disabled

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert is_telemetry_disabled()


def test_decide_uses_tolerance_per_metric():
    champ = {"image_auroc": 0.90, "pixel_auroc": 0.80}
    assert promotion.decide({"image_auroc": 0.895, "pixel_auroc": 0.80}, champ, 0.01)[0]
    ok, reason = promotion.decide({"image_auroc": 0.95, "pixel_auroc": 0.78}, champ, 0.01)
    assert not ok and "pixel_auroc" in reason and "image_auroc" not in reason
    assert not promotion.decide({"image_auroc": 0.95, "pixel_auroc": None}, champ, 0.01)[0]
    assert promotion.decide({"image_auroc": 0.5, "pixel_auroc": 0.5}, None, 0.01)[0]
    assert not promotion.decide({"image_auroc": 0.5, "pixel_auroc": None}, None, 0.01)[0]


def test_cross_dataset_mean_needs_every_target():
    m = {"a/mean/image_auroc": 0.8, "b/mean/image_auroc": 0.6, "a/mean/pixel_auroc": 0.9}
    means = promotion.cross_dataset_means(m, ["a", "b"], ["image_auroc", "pixel_auroc"])
    assert means["image_auroc"] == pytest.approx(0.7)
    assert means["pixel_auroc"] is None
    nan = {"a/mean/image_auroc": math.nan, "b/mean/image_auroc": 0.6}
    assert promotion.cross_dataset_means(nan, ["a", "b"], ["image_auroc"])["image_auroc"] is None


@pytest.mark.slow  # a SQLite MLflow registry per test (the edge; decide/means stay fast)
def test_promotion_refuses_worse_accepts_better_forced_overrides(cfg):
    v1 = fake_version(cfg, {"a": (0.80, 0.90), "b": (0.70, 0.80)})  # means 0.75 / 0.85
    first = promotion.promote(v1, cfg)
    assert first["decision"] == "promoted" and champion(cfg) == v1

    # image mean 0.75 -> 0.735 (drop 0.015 > tolerance 0.01): refused, champion unchanged
    v2 = fake_version(cfg, {"a": (0.78, 0.90), "b": (0.69, 0.80)})
    refused = promotion.promote(v2, cfg)
    assert refused["decision"] == "refused" and not refused["promoted"]
    assert champion(cfg) == v1
    tags = version_tags(cfg, v2)
    assert tags["dzad.promotion.decision"] == "refused"
    assert float(tags["dzad.promotion.image_auroc"]) == pytest.approx(0.735)
    assert float(tags["dzad.promotion.champion_image_auroc"]) == pytest.approx(0.75)
    assert float(tags["dzad.promotion.pixel_auroc"]) == pytest.approx(0.85)
    assert tags["dzad.promotion.champion_version"] == v1

    # within tolerance (image -0.005, pixel better): promoted
    v3 = fake_version(cfg, {"a": (0.79, 0.95), "b": (0.70, 0.85)})
    assert promotion.promote(v3, cfg)["promoted"] and champion(cfg) == v3

    # a worse pixel AUROC alone also blocks; --force overrides and says so
    v4 = fake_version(cfg, {"a": (0.99, 0.50), "b": (0.99, 0.50)})
    assert not promotion.promote(v4, cfg)["promoted"] and champion(cfg) == v3
    forced = promotion.promote(v4, cfg, force=True)
    assert forced["decision"] == "forced" and champion(cfg) == v4
    assert version_tags(cfg, v4)["dzad.promotion.decision"] == "forced"


@pytest.mark.slow  # a SQLite MLflow registry per test (the edge; decide/means stay fast)
def test_promotion_targets_are_configurable(cfg):
    only_a = dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, promotion_targets=("a",))
    )
    v1 = fake_version(cfg, {"a": (0.80, 0.80), "b": (0.90, 0.90)})
    v2 = fake_version(cfg, {"a": (0.85, 0.85), "b": (0.10, 0.10)})  # better on a, awful on b
    assert promotion.promote(v2, only_a)["promoted"]
    assert not promotion.promote(v1, only_a)["promoted"]  # a: 0.80 < 0.85 - 0.01
    assert promotion.promote(v1, cfg)["promoted"]  # mean over a and b: 0.85 vs 0.475
    assert champion(cfg) == v1


@pytest.mark.slow  # a SQLite MLflow registry per test (the edge; decide/means stay fast)
def test_version_without_metrics_is_refused_unless_forced(cfg):
    v1 = fake_version(cfg, {"a": (0.8, 0.8)})  # target b never evaluated
    result = promotion.promote(v1, cfg)
    assert result["decision"] == "refused" and "lacks" in result["reason"]
    assert promotion.promote(v1, cfg, force=True)["decision"] == "forced"
    assert champion(cfg) == v1


@pytest.mark.slow  # a SQLite MLflow registry (the edge)
def test_cli_promote_and_models(cfg, tmp_path):
    from flows.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(
        "sets:\n  targets:\n    a: {root: data/a}\n    b: {root: data/b}\n"
        f"tracking:\n  tolerance: 0.01\n  artifact_root: {tmp_path / 'mlartifacts'}\n"
    )
    v1 = fake_version(cfg, {"a": (0.8, 0.8), "b": (0.8, 0.8)})
    v2 = fake_version(cfg, {"a": (0.5, 0.5), "b": (0.5, 0.5)})
    runner = CliRunner()
    ok = runner.invoke(app, ["promote", v1, "--params", str(params)])
    assert ok.exit_code == 0, ok.output
    assert "promoted" in ok.output
    refused = runner.invoke(app, ["promote", v2, "--params", str(params)])
    assert refused.exit_code == 1 and "refused" in refused.output
    assert champion(cfg) == v1
    forced = runner.invoke(app, ["promote", v2, "--force", "--params", str(params)])
    assert forced.exit_code == 0 and "forced" in forced.output
    assert champion(cfg) == v2
    listing = runner.invoke(app, ["models", "--params", str(params)])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.strip().splitlines()
    assert lines[1].split("\t")[:3] == [v2, "champion", "forced"]
    assert lines[2].split("\t")[:3] == [v1, "-", "promoted"]
    missing = runner.invoke(app, ["promote", "99", "--params", str(params)])
    assert missing.exit_code == 2 and "no version 99" in missing.output


def test_resolve_model_errors_name_the_uri(cfg):
    with pytest.raises(DZADInputError, match="not a registry URI"):
        registry.resolve_model("runs:/abc/model", cfg=cfg)
    with pytest.raises(DZADInputError, match="models:/dzad@champion"):
        registry.resolve_model("models:/dzad@champion", cfg=cfg)


def test_pyfunc_array_inputs_follow_the_image_conventions():
    import numpy as np
    import torch

    from flows.pyfunc import array_image

    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    x = array_image(rgb, 4)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.equal(array_image(x.numpy(), 4), x)  # (C,H,W) float in [0,1] kept as is
    grey = array_image(np.full((4, 4), 65535, np.uint16), 4)
    assert grey.shape == (3, 4, 4) and torch.all(grey == 1.0)
    assert array_image(rgb, 2).shape == (3, 2, 2)  # other sizes are resized
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        array_image(np.full((4, 4, 3), 2.0), 4)
    with pytest.raises(ValueError, match="C 1\\|3"):
        array_image(np.zeros((4, 4, 5), np.uint8), 4)


@pytest.mark.slow  # a SQLite MLflow registry per test (the edge; decide/means stay fast)
def test_concurrent_promotions_leave_the_better_champion(cfg, monkeypatch):
    """Two promotions started together: without a compare-and-set both read "no champion" and both
    win; the slow metric read here widens that window so the race happens every time."""
    import threading
    import time

    worse = fake_version(cfg, {"a": (0.6, 0.6), "b": (0.6, 0.6)})
    better = fake_version(cfg, {"a": (0.9, 0.9), "b": (0.9, 0.9)})
    real = promotion._version_means

    def slow(*args):
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(promotion, "_version_means", slow)
    start, results = threading.Barrier(2), {}

    def run(number: str) -> None:
        start.wait()
        results[number] = promotion.promote(number, cfg)

    threads = [threading.Thread(target=run, args=(v,)) for v in (worse, better)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert champion(cfg) == better
    w, b = results[worse], results[better]
    assert b["promoted"]
    if w["promoted"]:  # the worse went first: the better one then beat it, and says so
        assert w["champion_version"] is None and b["champion_version"] == worse
    else:  # the better went first: the worse one was compared with it and refused
        assert b["champion_version"] is None and w["champion_version"] == better


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["models"], ["promote", "3"]], ids=["models", "promote"])
def test_dead_tracking_server_fails_fast_naming_it(tmp_path, monkeypatch, command):
    import time

    from flows.cli import app

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    began = time.monotonic()
    result = CliRunner().invoke(app, command)
    assert time.monotonic() - began < 20
    assert result.exit_code == 2
    assert uri in result.stderr and "unreachable" in result.stderr


def test_registry_look_up_without_a_store_creates_nothing(tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DZADInputError, match="no tracking store"):
        registry.resolve_model("models:/dzad@champion")
    for command in (["models"], ["promote", "1"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "mlflow.db" in result.stderr
    assert list(tmp_path.iterdir()) == []
