"""`dvc repro` for real: the `tiny` study in a temporary copy of the repository.

The copy holds the code, dvc.yaml, the studies and the DVC config, never the outputs of a previous
run (data/, models/, runs/, metrics/, plots/, reports/, dvc.lock), so everything checked here was
produced by this run. A second `dvc repro` must then be a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
COPY = ("dzad", "flows", "studies", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore")
DVC_FILES = (".dvc/config", ".dvc/.gitignore", ".dvc/plots/roc.json", ".dvc/plots/pr_step.json")
ENV = {
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # tiny models; the test often shares 2 cores with other processes
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def sh(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh copy with studies/tiny.yaml as params.yaml, committed, after one `dvc repro`."""
    if shutil.which("git") is None or shutil.which("dvc") is None:
        pytest.skip("git and dvc are needed")
    dest = tmp_path_factory.mktemp("pipeline") / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*.tmp")
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for name in DVC_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    shutil.copy2(dest / "studies" / "tiny.yaml", dest / "params.yaml")
    sh(["git", "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-qm", "tiny study"], dest)
    first = sh(["dvc", "repro"], dest)
    (dest / "first_repro.log").write_text(first.stdout)
    return dest


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_sane_outputs(repo):
    log = (repo / "first_repro.log").read_text()
    stages = ("prepare", "preprocess_source", "preprocess_target@objects", "train",
              "evaluate@objects", "evaluate@mesh", "regimes@objects", "regimes@mesh", "ablate",
              "report")  # fmt: skip
    for stage in stages:
        assert f"Running stage '{stage}'" in log
    for target, cats in (("objects", {"washer", "nut"}), ("mesh", {"mesh"})):
        m = json.loads((repo / "metrics" / f"eval_{target}.json").read_text())
        assert m["target"] == target and m["seeds"] == [0]
        assert set(m["categories"]) == cats
        for metric in ("image_auroc", "pixel_auroc"):
            assert 0.0 <= m["dzad"][metric]["mean"] <= 1.0
        assert {"mean_intensity", "laplacian", "feature_mean", "feature_knn"} <= set(m["controls"])
        roc = pd.read_csv(repo / "plots" / f"roc_{target}.csv")
        assert (roc.iloc[0]["fpr"], roc.iloc[-1]["tpr"]) == (0.0, 1.0)
    ablation = json.loads((repo / "metrics" / "ablation.json").read_text())
    assert set(ablation["weighting"]) == {
        "uniform", "snr", "snr_prime", "exp6", "exp7", "dzad_k1", "dzad_k5", "dzad",
    }  # fmt: skip
    assert set(ablation["timesteps"]) == {"500", "999"}
    summary = (repo / "reports" / "summary.md").read_text()
    assert "| control: feature_knn |" in summary and "objects: image_auroc" in summary
    index = (repo / "reports" / "index.md").read_text()
    assert "# Study `tiny`" in index and "Table 4" in index and "Figure 4" in index
    assert (repo / "reports" / "objects_roc.png").stat().st_size > 0
    assert (repo / "models" / "seed_0" / "dzad.json").is_file()
    lock = (repo / "dvc.lock").read_text()
    assert "evaluate@mesh" in lock and "sets.targets.mesh" in lock
    for name in ("batch_zero_shot_dzad", "batch_zero_shot_control_mutual", "few_shot_dzad"):
        assert (repo / "metrics" / "regimes_objects" / f"{name}.json").is_file()
    assert "| batch zero-shot: control: mutual scoring" in index


@pytest.mark.slow
def test_second_repro_is_a_no_op(repo):
    again = sh(["dvc", "repro"], repo)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    status = sh(["dvc", "status"], repo)
    assert "up to date" in status.stdout


@pytest.mark.slow
def test_metrics_and_plots_commands_read_the_outputs(repo):
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = next(iter(shown.values()))["data"]
    # compact metrics: one row per target and method, the full summaries are plain outputs
    assert {"metrics/eval_objects/dzad.json", "metrics/eval_mesh/control_laplacian.json"} <= set(
        files
    )
    assert "metrics/eval_objects.json" not in files and "metrics/ablation.json" not in files
    compact = files["metrics/eval_objects/dzad.json"]["data"]
    written = json.loads((repo / "metrics/eval_objects.json").read_text())
    assert compact == {
        m: written["dzad"][m]["mean"] for m in ("image_auroc", "pixel_auroc", "aupro")
    }
    table = sh(["dvc", "metrics", "show"], repo).stdout.splitlines()
    assert len(table) == 1 + len(files) and max(map(len, table)) <= 120
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "outputs"], repo)
    diff = sh(["dvc", "plots", "diff", "HEAD", "--json", "--split"], repo)
    plotted = json.loads(diff.stdout)
    assert "errors" not in plotted
    assert {"plots/roc_objects.csv", "plots/pr_mesh.csv", "plots/ablation_weighting.csv"} <= set(
        plotted["data"]
    )


def _registry_versions(repo: Path) -> dict[str, set[str]]:
    """``{version: aliases}`` of model `dzad` in the copy's MLflow store."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    c = MlflowClient(uri, registry_uri=uri)  # not a registry an earlier test set process-wide
    aliases = c.get_registered_model("dzad").aliases
    return {
        str(mv.version): {a for a, v in aliases.items() if str(v) == str(mv.version)}
        for mv in c.search_model_versions("name = 'dzad'")
    }


@pytest.mark.slow
def test_register_stage_is_never_restored_without_registering(repo):
    """With the registry gone, `dvc repro` must register again, not restore register.json from
    the run cache: the registry then holds the version (and alias) the output claims."""
    for name in ("mlflow.db", "mlartifacts", "runs/register.json"):
        path = repo / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    log = sh(["dvc", "repro"], repo).stdout
    assert "Running stage 'register'" in log  # run, not restored from the run cache
    claimed = json.loads((repo / "runs" / "register.json").read_text())
    versions = _registry_versions(repo)
    assert str(claimed["version"]) in versions
    if claimed["promoted"]:
        assert "champion" in versions[str(claimed["version"])]


@pytest.mark.slow
def test_dvc_exp_run_set_param(repo):
    """`dvc exp run -S` rewrites params.yaml without quotes (`mixed_precision: no`); the study
    must still load it as the string 'no' and train with the new value."""
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "before the experiment", "--allow-empty"], repo)
    sh(["dvc", "exp", "run", "-S", "train.steps=30"], repo, timeout=1500)
    meta = json.loads((repo / "models" / "seed_0" / "dzad.json").read_text())
    assert meta["train"]["step"] == 30 and meta["train"]["complete"]
    assert meta["config"]["train"]["mixed_precision"] == "no"
    assert meta["data"]["images"] > 0 and meta["data"]["categories"] == ["grain", "weave"]
    assert json.loads((repo / "metrics" / "eval_mesh.json").read_text())["dzad"]


def _defects_only(repo: Path) -> Path:
    """An MVTec-layout root whose one category has defect images and masks only (no good ones),
    from the tiny study's synthetic `washer`."""
    src, root = repo / "data" / "raw" / "synth" / "objects" / "washer", repo / "defects_only"
    for part in ("test", "ground_truth"):
        shutil.copytree(src / part, root / "washer" / part, ignore=shutil.ignore_patterns("good"))
    assert not (root / "washer" / "test" / "good").exists()
    return root


@pytest.mark.slow
def test_defects_only_target_gets_pixel_metrics_through_dvc_repro(repo):
    from ruamel.yaml import YAML  # round trip: YAML 1.2 as DVC writes it (`no` stays a string)

    root = _defects_only(repo)
    yaml = YAML()
    params = yaml.load(repo / "params.yaml")
    params["sets"]["targets"]["only"] = {"root": root.name, "categories": []}
    yaml.dump(params, repo / "params.yaml")
    log = sh(["dvc", "repro"], repo, timeout=1500).stdout
    assert "Running stage 'evaluate@only'" in log
    m = json.loads((repo / "metrics" / "eval_only.json").read_text())
    for metric in ("pixel_auroc", "aupro"):
        assert 0.0 <= m["dzad"][metric]["mean"] <= 1.0
    assert m["dzad"]["image_auroc"]["mean"] is None
    assert "no good (normal) test images" in m["undefined"]["washer"]["image_auroc"]
    assert pd.read_csv(repo / "plots" / "roc_only.csv").empty  # no image-level curve
    index = (repo / "reports" / "index.md").read_text()
    assert "only: pixel_auroc" in index and "Undefined metrics" in index
