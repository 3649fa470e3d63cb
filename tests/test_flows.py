"""Prefect flows, run for real: a temporary Prefect API (``prefect_test_harness``) for in-process
tests, and one test that serves the deployments behind ``prefect server start`` and runs
``prefect deployment run dzad/ablation --watch`` through the CLI. MLflow writes to a SQLite store in
the test's folder. The study is ``studies/tiny.yaml`` with the overrides ``SMALL``. The tests on a
Prefect API are slow (the harness and the tiny study take ~1 min on 2 cores); the fast tier checks
the retry, cache and arm rules they rely on (tests/test_flow_policies.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import yaml

from dzad.overrides import Overrides, apply_overrides
from dzad.study.seed_regimes import REGIME_DIRS, evaluate_regimes
from flows import parameters, pipeline, serve
from flows import tasks as flow_tasks

TINY = Path(__file__).resolve().parents[1] / "studies" / "tiny.yaml"
# -p overrides that keep the tiny study to seconds: both targets (mapped evaluate tasks load the
# checkpoint in parallel threads), two Table-4 weight functions and one Figure-4 start
# timestep (every in-process run of this file passes the same ones, so caches are shared)
SMALL = {"weightings": ["uniform", "dzad"], "t_starts": [500]}
ARMS = {("weighting", "uniform"), ("weighting", "dzad"), ("timesteps", "500")}
TARGETS = {"objects", "mesh"}
ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Path]:
    """A study folder (params, data, outputs, MLflow store) that is also the working directory."""
    root = tmp_path_factory.mktemp("flows")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("PREFECT_HOME", str(root / "prefect-home"))
        mp.chdir(root)
        yield root


@pytest.fixture(scope="module")
def harness(workdir) -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        yield


@pytest.fixture(scope="module")
def study(harness, workdir) -> dict:
    """The ablation stage of the tiny study, run once: the flow's result and its flow-run state."""
    state = _run(stage="ablation")
    assert state.is_completed(), state.message
    return {"result": state.result(), "state": state}


def _run(**params):
    """The orchestrator flow on the small tiny study, in this process; returns its final state."""
    return pipeline.dzad(params_file=str(TINY), out_dir="out", **SMALL, **params, return_state=True)


def _mlflow() -> mlflow.MlflowClient:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    return mlflow.MlflowClient(uri, registry_uri=uri)  # not a registry set process-wide earlier


def _children(parent_id: str) -> list:
    c = _mlflow()
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def _artifact_table(run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path=f"tables/{pipeline.ABLATION_TABLE}.csv",
        tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
    )
    return pd.read_csv(path, dtype={"setting": str})


def _artifact_text(run_id: str, path: str) -> str:
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, tracking_uri=os.environ["MLFLOW_TRACKING_URI"]
    )
    return Path(local).read_text()


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def _subflow_task_runs(flow_run_id) -> dict[str, str]:
    """``{task-run name: state name}`` of every task in the subflows of one orchestrator run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        parent = FlowRunFilterParentFlowRunId(any_=[flow_run_id])
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
    return {r.name: r.state.name for r in runs}


# ------------------------------------------------------------------------------ no Prefect API
def test_overrides_make_a_one_seed_study_and_name_it(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "seeds": [0, 1, 2]}))
    cfg = parameters.load_params(path)
    assert parameters.run_name("evaluate", cfg) == "evaluate-tiny-seeds0-1-2"
    given = Overrides(seed=3, device="cuda:1", weightings=["snr"], t_starts=[])
    one = apply_overrides(cfg, given)
    assert (one.seed, one.seeds, one.train.device) == (3, (3,), "cuda:1")
    assert (one.ablation.weightings, one.ablation.t_starts) == (("snr",), ())
    assert parameters.run_name("ablation", one) == "ablation-tiny-seed3"
    with pytest.raises(ValueError, match=r"\['nope'\] are not in sets.targets"):
        apply_overrides(cfg, Overrides(targets=["nope"]))


def test_params_are_parsed_once_per_content(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    raw = yaml.safe_load(TINY.read_text())
    path.write_text(yaml.safe_dump(raw))
    calls = []
    real = parameters.dzad_config.load
    monkeypatch.setattr(parameters.dzad_config, "load", lambda p: calls.append(p) or real(p))
    parameters._parse.cache_clear()
    assert parameters.load_params(path) is parameters.load_params(path)
    path.write_text(yaml.safe_dump({**raw, "seed": 5}))
    assert parameters.load_params(path).seed == 5
    assert len(calls) == 2


def test_dask_runner_is_optional_with_a_clear_error(monkeypatch):
    assert pipeline.task_runner(None) is None
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if not installed
    with pytest.raises(RuntimeError, match="pip install prefect-dask"):
        pipeline.task_runner("tcp://scheduler:8786")


def test_three_deployments_of_the_dzad_flow():
    deps = {d.name: d for d in serve.deployments("studies/x.yaml", "runs/x")}
    assert sorted(deps) == ["ablation", "evaluate", "train"]
    for name, dep in deps.items():
        assert dep.flow_name == "dzad"
        assert dep.parameters == {
            "stage": name,
            "params_file": "studies/x.yaml",
            "out_dir": "runs/x",
        }
        assert dep.entrypoint == "flows.pipeline.dzad"
        schema = dep._parameter_openapi_schema.properties
        assert {"params_file", "seed", "profile", "device", "weightings"} <= set(schema)


# ------------------------------------------------------------------- flows on a Prefect API
@pytest.mark.slow
def test_ablation_flow_maps_arms_and_logs_them(study, workdir):
    result = study["result"]
    table = pd.read_csv(result["table"], dtype={"setting": str})
    assert set(zip(table["ablation"], table["setting"], strict=True)) == ARMS
    assert set(table["target"]) == TARGETS and len(table) == len(ARMS) * len(TARGETS)
    assert table["image_auroc"].between(0, 1).all()
    # the Figure-4 rerun has pixel metrics, Table-4 rescoring has none (image score only)
    assert table.loc[table.ablation == "timesteps", "pixel_auroc"].between(0, 1).all()
    assert table.loc[table.ablation == "weighting", "pixel_auroc"].isna().all()

    flow_run_id = study["state"].state_details.flow_run_id
    tasks = _subflow_task_runs(flow_run_id)
    arms = {n for n in tasks if n.startswith("arm-")}
    assert arms == {f"arm-{k}={v}" for k, v in ARMS}
    assert {"train-seed0", "prepare-data", "preprocess-data"} | {
        f"evaluate-{t}-seed0" for t in TARGETS
    } <= {re.sub(r"-[0-9a-f]{3}$", "", n) for n in tasks}
    assert set(tasks.values()) == {"Completed"}
    (artifact,) = _artifacts("tiny-ablation-auroc")  # the table in the Prefect UI
    assert artifact.data == table.to_markdown(index=False)

    parent = _mlflow().get_run(result["mlflow_run_id"])
    assert parent.info.run_name == "ablation-tiny-seed0"
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    assert parent.data.params["model.profile"] == "tiny"
    pd.testing.assert_frame_equal(_artifact_table(parent.info.run_id), table)
    children = {r.info.run_name: r for r in _children(parent.info.run_id)}
    assert set(children) == {"train-tiny-seed0"} | {f"evaluate-tiny-{t}-seed0" for t in TARGETS} | {
        f"arm-tiny-{k}={v}" for k, v in ARMS
    }
    for kind, setting in ARMS:
        arm = children[f"arm-tiny-{kind}={setting}"]
        for target in TARGETS:
            row = table[(table.ablation == kind) & (table.setting == setting)]
            row = row[row.target == target].iloc[0]
            assert arm.data.metrics[f"{target}/image_auroc"] == pytest.approx(row["image_auroc"])
    for target in TARGETS:
        assert (
            f"{target}/mean/image_auroc" in children[f"evaluate-tiny-{target}-seed0"].data.metrics
        )
    # the flow's data is its own: nothing under the working directory's data/ (DVC's outputs)
    assert not (workdir / "data").exists()
    assert (workdir / "out" / "tiny" / "data" / "raw" / "datasets.json").is_file()


def _leaves(x: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(path, value)`` of every leaf of a JSON document."""
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else None
    if items is None:
        yield path, x
    for k, v in items or ():
        yield from _leaves(v, (*path, k))


@pytest.mark.slow
def test_evaluate_stage_runs_the_regimes_like_the_dvc_stage(study, workdir, tmp_path):
    """One regimes task per target wrote what ``dzad stage regimes`` (``evaluate_regimes``) writes
    for the same config; the regimes table (reports/regimes.md's) is in ``regimes/``, on the parent
    run with metrics named by target and regime, and in the Prefect UI."""
    from dzad.study.report_folder import decisions_table, regimes_table

    flow_run_id = study["state"].state_details.flow_run_id
    names = {re.sub(r"-[0-9a-f]{3}$", "", n) for n in _subflow_task_runs(flow_run_id)}
    assert {f"regimes-{t}" for t in TARGETS} <= names
    out = workdir / "out" / "tiny"
    cfg = parameters.own_data(
        apply_overrides(parameters.load_params(TINY), Overrides(**SMALL)), Path("out/tiny")
    )
    targets = list(cfg.sets.targets)  # the table's column order
    assert set(targets) == TARGETS
    flow_dirs = {t: out / "regimes" / t for t in targets}
    dvc_dirs = {t: tmp_path / t for t in targets}
    for target in targets:
        evaluate_regimes(cfg, out / "models", target, dvc_dirs[target])
        files = sorted(p.relative_to(dvc_dirs[target]) for p in dvc_dirs[target].rglob("*.json"))
        assert [str(f) for f in files] == [
            f"{r}/{f}" for r in REGIME_DIRS for f in ("seed_0/metrics.json", "summary.json")
        ]
        for rel in files:
            got = dict(_leaves(json.loads((flow_dirs[target] / rel).read_text())))
            want = dict(_leaves(json.loads((dvc_dirs[target] / rel).read_text())))
            assert got == pytest.approx(want), (target, rel)

    table = regimes_table({t: out / "eval" / t for t in targets}, dvc_dirs).to_markdown()
    assert (out / "regimes" / "regimes.md").read_text() == table
    assert _artifacts("tiny-regimes")[0].data == table
    run_id = study["result"]["mlflow_run_id"]
    assert _artifact_text(run_id, "tables/regimes.md") == table
    decided = decisions_table({t: out / "eval" / t for t in targets}, dvc_dirs).to_markdown()
    assert (out / "regimes" / "decisions.md").read_text() == decided
    assert _artifact_text(run_id, "tables/decisions.md") == decided
    metrics = _mlflow().get_run(run_id).data.metrics
    named = {tuple(k.split("/")[1:3]) for k in metrics if k.startswith("regimes/")}
    assert named == {(t, r) for t in TARGETS for r in REGIME_DIRS}
    for t, r in named:
        summary = json.loads((dvc_dirs[t] / r / "summary.json").read_text())
        mean = summary["dzad"]["pixel_auroc"]["mean"]
        assert metrics[f"regimes/{t}/{r}/mean/pixel_auroc"] == pytest.approx(mean)
        control = next(iter(summary["controls"]))
        mean = summary["controls"][control]["image_auroc"]["mean"]
        assert metrics[f"regimes/{t}/{r}/controls/{control}/mean/image_auroc"] == pytest.approx(
            mean
        )


@pytest.mark.slow
def test_rerun_reuses_cached_results(study, workdir):
    ckpt = Path(study["result"]["models"][0]["checkpoint"]) / "dzad.json"
    before = ckpt.stat().st_mtime_ns
    state = _run(stage="ablation")
    assert state.is_completed(), state.message
    tasks = _subflow_task_runs(state.state_details.flow_run_id)
    kinds = ("train-", "evaluate-", "regimes-", "arm-")
    expensive = {n: s for n, s in tasks.items() if n.startswith(kinds)}
    assert len(expensive) == 1 + 2 * len(TARGETS) + len(ARMS)
    assert set(expensive.values()) == {"Cached"}
    assert ckpt.stat().st_mtime_ns == before
    result = state.result()
    assert _children(result["mlflow_run_id"]) == []  # nothing reran, so no nested run
    first = pd.read_csv(study["result"]["table"], dtype={"setting": str})
    pd.testing.assert_frame_equal(_artifact_table(result["mlflow_run_id"]), first)
    # cached regimes are logged on the new parent run too
    assert (
        "regimes/mesh/few_shot/mean/image_auroc"
        in _mlflow().get_run(result["mlflow_run_id"]).data.metrics
    )


@pytest.mark.slow
def test_training_cache_ignores_what_training_does_not_read(study, workdir):
    """Another target list (and its manifests) reuses the trained checkpoint."""
    state = _run(stage="evaluate", targets=["mesh"])
    assert state.is_completed(), state.message
    tasks = _subflow_task_runs(state.state_details.flow_run_id)
    assert tasks["train-seed0"] == "Cached"


@pytest.mark.slow
def test_seed_override_retrains_and_names_the_run(study, workdir):
    state = _run(stage="train", seed=1)
    assert state.is_completed(), state.message
    tasks = _subflow_task_runs(state.state_details.flow_run_id)
    assert tasks["train-seed1"] == "Completed"
    models = state.result()["models"]
    assert list(models) == [1] and models[1]["checkpoint"].endswith("models/seed_1")
    assert models[1]["fingerprint"] != study["result"]["models"][0]["fingerprint"]
    assert _mlflow().get_run(state.result()["mlflow_run_id"]).info.run_name == "train-tiny-seed1"


@pytest.mark.slow
def test_io_task_retries_oserror_only(study, workdir, monkeypatch):
    calls = []
    real = flow_tasks.prepare_data

    def flaky(cfg, **kwargs):
        calls.append(cfg)
        if len(calls) == 1:
            raise ConnectionResetError("download interrupted")
        return real(cfg, **kwargs)

    monkeypatch.setattr(flow_tasks, "prepare_data", flaky)
    monkeypatch.setattr(
        pipeline, "prepare_task", pipeline.prepare_task.with_options(retry_delay_seconds=0)
    )
    state = _run(stage="train")
    assert state.is_completed(), state.message
    assert len(calls) == 2

    def bad(cfg, **kwargs):
        calls.append(cfg)
        raise ValueError("sets.fetch: unknown dataset 'x'")

    monkeypatch.setattr(flow_tasks, "prepare_data", bad)
    calls.clear()
    state = _run(stage="train")
    assert state.is_failed()
    assert len(calls) == 1  # a bad input is not retried


@pytest.mark.slow
def test_missing_params_file_fails_with_the_reason(harness, workdir):
    state = pipeline.dzad(params_file="nowhere.yaml", out_dir="out", return_state=True)
    assert state.is_failed()
    assert "nowhere.yaml" in state.message
    with pytest.raises(ValueError, match=r"nowhere\.yaml"):
        state.result()


# ------------------------------------------------------- served deployments through the CLI
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not ready after {timeout} s\n{log.read_text()[-3000:]}")
        time.sleep(1)


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def served(workdir, tmp_path) -> Iterator[dict[str, str]]:
    """``prefect server start`` + ``python -m flows.serve`` in a folder holding ``studies/``; both
    always terminated. Yields their environment."""
    with _serving(workdir, tmp_path) as (env, _):
        yield env


@contextlib.contextmanager
def _serving(workdir, tmp_path) -> Iterator[tuple[dict[str, str], list[subprocess.Popen]]]:
    """:func:`served`'s processes: (environment, [server, serve])."""
    shutil.copytree(TINY.parent, workdir / "studies", dirs_exist_ok=True)
    port = _free_port()
    env = {**os.environ, **ENV, "PREFECT_HOME": str(tmp_path / "home")}
    env["PREFECT_API_URL"] = api = f"http://127.0.0.1:{port}/api"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    procs = []
    try:
        with server_log.open("w") as log:
            cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        _wait(lambda: _get(f"{api}/health"), "prefect server", procs[0], server_log)
        with serve_log.open("w") as log:
            cmd = [sys.executable, "-m", "flows.serve"]  # as the README says
            procs.append(
                subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
            )

        def deployed() -> bool:
            return _get(f"{api}/deployments/name/dzad/ablation")

        _wait(deployed, "flows.serve", procs[1], serve_log)
        yield env, procs
    finally:
        for proc in reversed(procs):  # the server last: serve reports to it on shutdown
            _stop(proc)


@pytest.mark.slow
def test_serve_stops_on_sigterm_when_the_server_is_already_gone(workdir, tmp_path):
    """Stopping the Prefect server first, then ``flows.serve``: it exits promptly. With Prefect's
    default (pause every deployment on shutdown) it waited on the unreachable API."""
    with _serving(workdir, tmp_path) as (_, (server, serve)):
        _stop(server)
        serve.terminate()
        serve.wait(timeout=30)  # raises TimeoutExpired while it hangs
        assert serve.returncode is not None


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["prefect", *args], env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_served_ablation_deployment_runs_the_readme_command(study, served, workdir):
    """The README's commands, literally: `python -m flows.serve` and `prefect deployment run
    dzad/ablation --watch -p params_file=studies/tiny.yaml`: the whole tiny study (two targets,
    every arm of its ablation section) through Prefect's default task runner."""
    from dzad.config import load

    readme = [
        "deployment",
        "run",
        "dzad/ablation",
        "--watch",
        "-p",
        "params_file=studies/tiny.yaml",
    ]
    run = _cli(served, *readme)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ablation-tiny-seed0" in run.stdout and "Completed" in run.stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    table = pd.read_csv(
        workdir / "runs" / "prefect" / "tiny" / "ablation" / "ablation_auroc.csv",
        dtype={"setting": str},
    )
    abl = load(TINY).ablation
    arms = {("weighting", w) for w in abl.weightings} | {
        ("timesteps", str(t)) for t in abl.t_starts
    }
    assert set(zip(table["ablation"], table["setting"], strict=True)) == arms
    assert set(table["target"]) == TARGETS and len(table) == len(arms) * len(TARGETS)
    assert table["image_auroc"].between(0, 1).all()
    c = _mlflow()
    exp = c.get_experiment_by_name("dzad").experiment_id
    (parent,) = c.search_runs([exp], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "ablation-tiny-seed0"
    pd.testing.assert_frame_equal(_artifact_table(parent.info.run_id), table)

    missing = "params_file=gone.yaml"
    bad = _cli(served, "deployment", "run", "dzad/ablation", "--watch", "-p", missing)
    assert bad.returncode != 0 and "Failed" in bad.stdout
    bad_id = re.search(r"UUID: ([0-9a-f-]{36})", bad.stdout).group(1)
    logs = _cli(served, "flow-run", "logs", bad_id)
    assert "gone.yaml" in logs.stdout, logs.stdout
