"""A `tiny` train + evaluate + register against a temporary SQLite store, read back through MLflow.

One module-scoped study laid out like a Prefect flow run: a parent run with a nested training run
(tracking callbacks on, the model registered there) and a nested evaluation run. The tests check
what the store holds -- params, per-step curves, provenance, metrics, tables, figures -- that the
registered pyfunc scores exactly like the library, promotion, offline resolution and the DVC stage.
The study is a whole flow (preprocess, train, register, evaluate, promote) and one test imports the
logged model in a fresh interpreter, so its tests are slow; the fast tier checks the registry and
promotion rules on versions made without training (tests/test_registry.py).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dzad.checkpoint import read_meta
from dzad.config import DatasetRef, TrackingConfig, flatten, to_dict

promotion = pytest.importorskip("flows.tracking.promotion")
registry = pytest.importorskip("flows.tracking.registry")
results = pytest.importorskip("flows.tracking.results")
runs = pytest.importorskip("flows.tracking.runs")
training = pytest.importorskip("flows.tracking.training")
mlflow = pytest.importorskip("mlflow")
pyfunc = pytest.importorskip("flows.pyfunc")

TARGET = "textures"
STEPS = 12  # training steps of this file's model: two flushes of the buffered step metrics


@pytest.fixture(scope="module")
def study(tmp_path_factory, synth_root, tiny_config):
    """Preprocess, train (callbacks on), register, evaluate one target; returns what tests read."""
    from dzad.study.data import preprocess_data
    from dzad.study.seed_evaluation import evaluate_target
    from dzad.study.seed_training import train_model

    tmp = tmp_path_factory.mktemp("tracking")
    sets = dataclasses.replace(
        tiny_config.sets,
        source=(DatasetRef(str(synth_root), ("weave",)),),
        targets={TARGET: DatasetRef(str(synth_root), ("grain",))},
    )
    cfg = dataclasses.replace(
        tiny_config,
        data=dataclasses.replace(tiny_config.data, cache_dir=str(tmp / "cache")),
        train=dataclasses.replace(tiny_config.train, steps=STEPS),
        sets=sets,
        tracking=TrackingConfig(
            tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", artifact_root=str(tmp / "mlartifacts")
        ),
    )
    ckpt, eval_dir = tmp / "models" / "seed_0", tmp / "eval" / TARGET / "seed_0"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        preprocess_data(cfg)
        with runs.start_run(cfg, "study") as parent:
            with runs.start_run(cfg, "train", nested=True) as train_run:
                callbacks = training.training_callbacks(train_run, cfg)
                result = train_model(cfg, ckpt, callbacks=callbacks)
                training.log_training(train_run, cfg, ckpt, {"source_0": "ab" * 32}, result=result)
            version = registry.register(ckpt, train_run.info.run_id, cfg)
            with runs.start_run(cfg, "evaluate", nested=True) as eval_run:
                metrics = evaluate_target(ckpt, cfg, TARGET, eval_dir)
                results.log_evaluation(eval_run, TARGET, metrics, eval_dir)
        decision = promotion.promote(version, cfg)
        yield {
            "cfg": cfg,
            "parent": parent.info.run_id,
            "train_run": train_run.info.run_id,
            "eval_run": eval_run.info.run_id,
            "result": result,
            "metrics": metrics,
            "ckpt": ckpt,
            "eval_dir": eval_dir,
            "version": version,
            "decision": decision,
            "client": runs.client(cfg),
            "tmp": tmp,
        }


@pytest.mark.slow
def test_training_run_logs_params_curves_tags_and_checkpoint(study):
    c, rid, cfg = study["client"], study["train_run"], study["cfg"]
    run = c.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == study["parent"]
    assert set(run.data.params) == set(flatten(cfg))
    assert run.data.params["model.profile"] == "tiny"
    assert run.data.params["train.steps"] == str(STEPS)
    assert json.loads(run.data.params["seeds"]) == [0]

    loss = sorted(c.get_metric_history(rid, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([m.value for m in loss], study["result"].losses)
    speed = c.get_metric_history(rid, "train/images_per_s")
    assert len(speed) == STEPS and all(m.value > 0 for m in speed)
    assert run.data.metrics["train/images_per_s_mean"] == pytest.approx(
        study["result"].images_per_second
    )

    tags = run.data.tags
    assert tags["dzad.manifest.source_0"] == "ab" * 32
    assert tags["dzad.train.step"] == str(STEPS)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["dzad.git_commit"] == head.stdout.strip()
        assert tags["dzad.git_dirty"] in ("true", "false")

    names = {Path(a.path).name for a in c.list_artifacts(rid, "checkpoint")}
    assert {"dzad.json", "extra.safetensors", "unet", "sg"} <= names
    assert "train_state" not in names  # optimizer state stays out unless log_train_state
    logged = Path(c.download_artifacts(rid, "checkpoint/dzad.json", str(study["tmp"])))
    assert logged.read_text() == (study["ckpt"] / "dzad.json").read_text()


@pytest.mark.slow
def test_evaluation_run_logs_named_metrics_tables_and_figures(study):
    c, rid, metrics = study["client"], study["eval_run"], study["metrics"]
    logged = c.get_run(rid).data.metrics
    cats = sorted(metrics["categories"])
    assert cats == ["grain"]
    for cat in cats:
        for metric, value in metrics["categories"][cat].items():
            if value is not None:
                assert logged[f"{TARGET}/{cat}/{metric}"] == pytest.approx(value)
    assert logged[f"{TARGET}/mean/image_auroc"] == pytest.approx(metrics["mean"]["image_auroc"])
    assert logged[f"{TARGET}/mean/pixel_auroc"] == pytest.approx(metrics["mean"]["pixel_auroc"])
    for name, block in metrics["controls"].items():
        key = f"{TARGET}/controls/{name}/mean/image_auroc"
        assert logged[key] == pytest.approx(block["mean"]["image_auroc"])

    tables = {Path(a.path).name for a in c.list_artifacts(rid, f"tables/{TARGET}")}
    assert tables == {f"{m}.{ext}" for m in ("image_auroc", "pixel_auroc") for ext in ("csv", "md")}
    md = Path(c.download_artifacts(rid, f"tables/{TARGET}/image_auroc.md", str(study["tmp"])))
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| category | DZAD | control: ")
    mean_row = next(line for line in lines if line.startswith("| mean |"))
    assert mean_row.split("|")[2].strip() == f"{metrics['mean']['image_auroc']:.3f}"

    figures = {Path(a.path).name for a in c.list_artifacts(rid, f"evaluation/{TARGET}/figures")}
    assert figures == {f"{cat}_{kind}.png" for cat in cats for kind in ("roc", "pr", "heatmaps")}
    files = {Path(a.path).name for a in c.list_artifacts(rid, f"evaluation/{TARGET}")}
    assert {"metrics.json", "metrics.csv", "scores.csv"} <= files
    assert "noise_features.npz" not in files


def test_summary_over_seeds_is_logged_as_mean_and_std():
    from dzad.study.summaries import summarise

    def result(auroc: float) -> dict:
        block = {"image_auroc": auroc, "pixel_auroc": 0.5}
        return {"categories": {"a": block}, "mean": block, "controls": {}, "variants": {}}

    names = results.evaluation_metrics("t", summarise("t", {0: result(0.6), 1: result(0.8)}))
    assert names["t/mean/image_auroc"] == pytest.approx(0.7)
    assert names["t/mean/image_auroc_std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert names["t/a/image_auroc"] == pytest.approx(0.7)


@pytest.mark.slow
def test_registered_version_candidate_then_champion_from_sibling_evaluation(study):
    c, version, metrics = study["client"], study["version"], study["metrics"]
    assert str(version.run_id) == study["train_run"]
    assert str(c.get_model_version_by_alias("dzad", "candidate").version) == str(version.version)
    info = mlflow.models.get_model_info("models:/dzad@candidate")
    assert info.signature.inputs.input_names() == ["image"]
    assert "anomaly_map" in info.signature.outputs.input_names()
    assert info.saved_input_example_info is not None

    # the training run has no evaluation metrics: promotion found them on the sibling eval run
    decision = study["decision"]
    assert decision["decision"] == "promoted", decision
    assert decision["candidate"]["image_auroc"] == pytest.approx(metrics["mean"]["image_auroc"])
    assert decision["candidate"]["pixel_auroc"] == pytest.approx(metrics["mean"]["pixel_auroc"])
    tags = c.get_model_version("dzad", str(version.version)).tags
    assert float(tags["dzad.promotion.image_auroc"]) == pytest.approx(
        metrics["mean"]["image_auroc"], abs=1e-6
    )
    champion = c.get_model_version_by_alias("dzad", "champion").version
    assert str(champion) in (str(version.version), str(int(version.version) + 1))  # + DVC stage


@pytest.mark.slow
def test_pyfunc_champion_predicts_like_the_library(study):
    from dzad.data.images import load_image
    from dzad.study.seed_evaluation import load_model

    paths = sorted((Path(study["cfg"].sets.targets[TARGET].root) / "grain" / "test").rglob("*.png"))
    paths = [str(p) for p in paths[:5]]
    model = load_model(study["ckpt"], study["cfg"])
    images = torch.stack([load_image(p, model.image_size) for p in paths])
    expected = model(images)

    pyfunc = mlflow.pyfunc.load_model("models:/dzad@champion")
    by_path = pyfunc.predict(pd.DataFrame({"image": paths}))
    assert list(by_path.columns) == ["image_score", "detection_score", "decision", "anomaly_map"]
    np.testing.assert_allclose(by_path["image_score"], expected.image_score.numpy(), rtol=1e-6)
    np.testing.assert_allclose(by_path["detection_score"], expected.detection_score.numpy())
    assert by_path["decision"].tolist() == expected.decision.tolist()
    maps = np.stack(by_path["anomaly_map"].to_list())
    np.testing.assert_allclose(maps, expected.anomaly_map[:, 0].numpy(), rtol=1e-5, atol=1e-6)

    # the same pixels as a uint8 HWC batch and as float CHW arrays give the same answers
    uint8 = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    by_batch = pyfunc.predict({"image": uint8})
    np.testing.assert_allclose(by_batch["image_score"], by_path["image_score"], rtol=1e-6)
    by_array = pyfunc.predict(pd.DataFrame({"image": list(images.numpy())}))
    np.testing.assert_allclose(by_array["image_score"], by_path["image_score"], rtol=1e-6)


@pytest.mark.slow
def test_pyfunc_scores_a_path_and_its_array_the_same(study, tmp_path):
    """Images of another size than the model's: a file and the uint8 array of its pixels take
    the same resize, so they score the same (PNG and JPEG)."""
    from PIL import Image

    src = sorted((Path(study["cfg"].sets.targets[TARGET].root) / "grain" / "test").rglob("*.png"))
    paths = []
    for i, p in enumerate(src[:3]):
        big = Image.open(p).convert("RGB").resize((77, 90), Image.Resampling.BICUBIC)
        for suffix in (".png", ".jpg"):
            paths.append(tmp_path / f"{i}{suffix}")
            big.save(paths[-1], quality=90)
    pyfunc = mlflow.pyfunc.load_model("models:/dzad@champion")
    by_path = pyfunc.predict(pd.DataFrame({"image": [str(p) for p in paths]}))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    by_array = pyfunc.predict(pd.DataFrame({"image": arrays}))
    np.testing.assert_allclose(by_array["image_score"], by_path["image_score"], rtol=1e-6)
    np.testing.assert_allclose(by_array["detection_score"], by_path["detection_score"], rtol=1e-6)


SCORING_PROBE = """
import json, sys
from importlib.metadata import packages_distributions
import mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(pd.DataFrame({"image": [np.full((40, 40, 3), 100, np.uint8)]}))
import dzad
names = packages_distributions()
dists = {d.lower() for m in list(sys.modules) for d in names.get(m.split(".")[0], [])}
print(json.dumps({"dists": sorted(dists), "dzad": dzad.__file__}))
"""


@pytest.mark.slow
def test_logged_model_is_self_contained_and_described(study, tmp_path):
    """requirements.txt pins what scoring imports (of dzad's dependencies) and nothing else (no
    DVC, Prefect); the dzad code travels with the model and is what it runs; the version's
    description says what the input is and how to load it elsewhere."""
    from importlib.metadata import requires

    c = study["client"]
    mv = c.get_model_version("dzad", study["version"].version)
    local = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path)))
    pinned = {registry._name(r) for r in (local / "requirements.txt").read_text().split()}
    assert not pinned & {"dvc", "prefect", "typer", "rich", "matplotlib", "scikit-learn"}
    probe = subprocess.run(
        [sys.executable, "-c", SCORING_PROBE, str(local)],
        capture_output=True, text=True, timeout=600, check=True, cwd=tmp_path,
    )  # fmt: skip
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    own = {registry._name(r) for r in requires("dzad") or [] if "extra ==" not in r}
    assert own & set(seen["dists"]) == pinned - {"dzad"}  # imported by scoring = pinned
    assert Path(seen["dzad"]).is_relative_to(local / "code")  # the model's own dzad code
    meta = mlflow.models.Model.load(str(local)).metadata
    assert meta["input"] == pyfunc.INPUT_DOC
    assert "pip install -r requirements.txt" in mv.description
    assert "Trained on" in mv.description and mv.tags["dzad.data.manifest_sha256"]


@pytest.mark.slow
def test_resolve_model_works_offline_in_place(study, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    folder = registry.resolve_model("models:/dzad@champion", cfg=study["cfg"])
    assert folder.is_relative_to(study["tmp"] / "mlartifacts")  # read in place, not copied
    assert (folder / "dzad.json").read_text() == (study["ckpt"] / "dzad.json").read_text()
    assert not (folder / "train_state").exists()
    champion = study["client"].get_model_version_by_alias("dzad", "champion").version
    assert registry.resolve_model(f"models:/dzad/{champion}", cfg=study["cfg"]) == folder
    # `dzad score --model models:/...` passes no config: MLFLOW_TRACKING_URI names the store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["cfg"].tracking.tracking_uri)
    assert registry.resolve_model("models:/dzad@champion") == folder


@pytest.mark.slow
def test_dvc_register_stage_logs_registers_and_promotes(study):
    from dzad.study.summaries import summarise, write_json
    from flows import register

    cfg, tmp = study["cfg"], study["tmp"]
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(cfg)))
    summary = summarise(TARGET, {0: study["metrics"]})
    metrics_file = write_json(tmp / "metrics" / f"{TARGET}.json", summary)
    out = tmp / "metrics" / "registry.json"
    argv = ["--params", str(params), "--checkpoint", str(study["ckpt"].parent)]  # models/
    argv += ["--metrics", str(metrics_file), "--eval-root", str(tmp / "eval"), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert register.main(argv) == 0
    decision = json.loads(out.read_text())
    assert decision["decision"] == "promoted"  # same model, same numbers: not worse
    c = study["client"]
    run = c.get_run(decision["run_id"])
    assert run.data.metrics[f"{TARGET}/mean/image_auroc"] == pytest.approx(
        study["metrics"]["mean"]["image_auroc"]
    )
    assert run.data.tags["dzad.manifest.source_0"]
    assert run.info.run_name == f"register-{cfg.study}-seed{cfg.seed}"  # not just "register"
    assert run.data.tags["dzad.data.images"] == str(read_meta(study["ckpt"])["data"]["images"])
    assert str(c.get_model_version_by_alias("dzad", "champion").version) == decision["version"]
    seeds = {Path(a.path).name for a in c.list_artifacts(run.info.run_id, f"evaluation/{TARGET}")}
    assert "seed_0" in seeds
    bad = register.main([*argv[:4], "--metrics", str(params)])
    assert bad == 2
