"""dzad.study, its ablation stage included: one tiny study run in-process (2 seeds, every
ablation), checked against recomputation from its own stored outputs; plus unit tests on synthetic
noise features."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dzad import config
from dzad.errors import CheckpointError, DZADInputError
from dzad.metrics import image_metrics
from dzad.study import ablation_reruns, ablations
from dzad.study.ablations import ablate, export_ablation
from dzad.study.data import prepare_data, preprocess_data
from dzad.study.layout import checkpoints, target_cache
from dzad.study.report_folder import report
from dzad.study.seed_evaluation import (
    COMPACT_METRICS,
    evaluate_seeds,
    export_evaluation,
    seed_results,
)
from dzad.study.seed_regimes import evaluate_regimes, export_regimes
from dzad.study.seed_training import train_seeds
from dzad.study.summaries import mean_std, write_json
from dzad.weighting import weights_by_name

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def tiny_study() -> config.DZADConfig:
    """studies/tiny.yaml cut further: textures only, weave -> grain, 2 seeds, Table 3 on."""
    cfg = config.load(REPO / "studies" / "tiny.yaml")
    return replace(
        cfg,
        seeds=(0, 1),
        synth=replace(
            cfg.synth, families=("textures",), n_train=12, n_test_good=3, n_test_defect=4
        ),
        sets=replace(
            cfg.sets,
            source=(config.DatasetRef("data/raw/synth/textures", ("weave",)),),
            targets={"grain": config.DatasetRef("data/raw/synth/textures", ("grain",))},
        ),
        train=replace(cfg.train, steps=8),
        ablation=replace(cfg.ablation, t_starts=(500, 999), architecture=True),
        regime=replace(
            cfg.regime,
            image_size=32,
            degrees=(1, 3),
            few_shot_draws=2,
            dzad_weight=0.5,
            adapt_steps=0,
        ),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole study (prepare -> report) in a temporary working directory."""
    root = tmp_path_factory.mktemp("study")
    cfg = tiny_study()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        roots = prepare_data(cfg)
        caches = preprocess_data(cfg)
        trained = train_seeds(cfg, "models")
        summary = evaluate_seeds(cfg, "models", "grain", "runs/eval/grain")
        eval_dirs = {"grain": Path("runs/eval/grain")}
        regimes = evaluate_regimes(cfg, "models", "grain", "runs/regimes/grain")
        frame = ablate(cfg, Path("models"), eval_dirs, Path("runs/ablation"))
        regime_dirs = {"grain": Path("runs/regimes/grain")}
        files = report(cfg, eval_dirs, Path("runs/ablation"), Path("reports"), regime_dirs)
    return {
        "root": root, "cfg": cfg, "roots": roots, "caches": caches, "trained": trained,
        "summary": summary, "frame": frame, "files": files, "eval": root / "runs/eval/grain",
        "regimes": regimes,
    }  # fmt: skip


@pytest.mark.slow
def test_prepare_and_preprocess_write_every_dataset(run):
    record = json.loads((run["root"] / "data/raw/datasets.json").read_text())
    assert set(record) == {"source_0", "grain"}
    assert record["source_0"]["categories"]["weave"] == {
        "train": 12,
        "test_good": 3,
        "test_defect": 4,
    }
    assert set(run["caches"]) == {"source_0", "grain"}
    manifest = pd.read_csv(run["root"] / "data/cache/targets/grain/manifest.csv")
    assert set(manifest["category"]) == {"grain"}  # only the target's categories are cached


@pytest.mark.slow
def test_one_checkpoint_per_seed_and_seeds_differ(run):
    root = run["root"]
    for s in (0, 1):
        meta = json.loads((root / f"models/seed_{s}/dzad.json").read_text())
        assert meta["config"]["seed"] == s
    a = np.load(run["eval"] / "seed_0/noise_features.npz")["F"]
    b = np.load(run["eval"] / "seed_1/noise_features.npz")["F"]
    assert a.shape == b.shape and not np.allclose(a, b)


@pytest.mark.slow
def test_summary_is_mean_and_sample_std_over_seeds(run):
    per_seed = [json.loads((run["eval"] / f"seed_{s}/metrics.json").read_text()) for s in (0, 1)]
    values = [r["mean"]["pixel_auroc"] for r in per_seed]
    got = run["summary"]["dzad"]["pixel_auroc"]
    assert got["n"] == 2
    assert got["mean"] == pytest.approx(np.mean(values))
    assert got["std"] == pytest.approx(np.std(values, ddof=1))
    knn = [r["controls"]["feature_knn"]["mean"]["image_auroc"] for r in per_seed]
    assert run["summary"]["controls"]["feature_knn"]["image_auroc"]["mean"] == pytest.approx(
        np.mean(knn)
    )


@pytest.mark.slow
def test_table4_rescoring_equals_the_model_and_a_from_scratch_recomputation(run):
    with np.load(run["eval"] / "seed_0/noise_features.npz") as f:
        npz = dict(f)
    cfg = run["cfg"]
    scores = ablations.rescore_file(npz, ["dzad", "uniform", "exp6"], cfg.weighting.k)
    # the configured weighting rescored from F reproduces the model's own detection score
    np.testing.assert_allclose(scores["dzad"], npz["detection_score"], rtol=1e-5, atol=1e-6)
    # uniform and exp(-6t) from scratch: z-scored stage means with the stored SOURCE statistics
    z = (npz["F"].astype(np.float64).mean(2) - npz["stage_mean"]) / npz["stage_std"]
    n = z.shape[1]
    np.testing.assert_allclose(scores["uniform"], z.sum(1), rtol=1e-5, atol=1e-6)
    centre = (np.arange(n) + 0.5) / n
    np.testing.assert_allclose(scores["exp6"], z @ np.exp(-6 * centre), rtol=1e-5, atol=1e-6)
    # and the table holds the per-category AUROC of those scores, one result per seed
    record = json.loads((run["root"] / "runs/ablation/ablation.json").read_text())
    got = record["weighting"]["exp6"]["grain"]
    assert len(got) == 2
    expected = image_metrics(npz["label"], scores["exp6"])["image_auroc"]
    assert got[0]["categories"]["grain"]["image_auroc"] == pytest.approx(expected)


@pytest.mark.slow
def test_figure4_reuses_the_main_evaluation_and_reruns_the_other_start(run):
    record = json.loads((run["root"] / "runs/ablation/ablation.json").read_text())
    main = json.loads((run["eval"] / "seed_1/metrics.json").read_text())
    assert record["timesteps"]["999"]["grain"][1]["mean"] == main["mean"]
    rerun = run["root"] / "runs/ablation/timesteps/t_500/grain/seed_1/metrics.json"
    assert rerun.is_file()
    rerun = json.loads(rerun.read_text())
    assert record["timesteps"]["500"]["grain"][1]["mean"] == rerun["mean"]
    assert rerun["controls"] == {}  # reruns score DZAD only


@pytest.mark.slow
def test_table3_rows(run):
    root = run["root"]
    record = json.loads((root / "runs/ablation/ablation.json").read_text())
    rows = record["architecture"]["grain"]
    assert [r["flags"] for r in rows] == [dict(f) for f in ablation_reruns.TABLE3_ROWS]
    # SD row: its own checkpoints, without the SG network, one noise stage
    sd = json.loads((root / "runs/ablation/architecture/sd_model/seed_0/dzad.json").read_text())
    assert sd["config"]["model"]["use_sg"] is False and sd["config"]["noise"]["n_stages"] == 1
    assert not (root / "runs/ablation/architecture/sd_model/seed_0/sg").exists()
    # without M_t: the recalibrated SG model scores one stage
    f1 = np.load(root / "runs/ablation/architecture/SD+SGSD/grain/seed_0/noise_features.npz")["F"]
    assert f1.shape[1] == 1
    # +M_t+w_t (no F_b) keeps the model's calibration, so its cls is the main detection score's
    main = [json.loads((run["eval"] / f"seed_{s}/metrics.json").read_text()) for s in (0, 1)]
    det = [m["variants"]["detection_score"]["mean"]["image_auroc"] for m in main]
    mt_wt = rows[4]["results"]
    assert [r["mean"]["image_auroc"] for r in mt_wt] == pytest.approx(det)
    # the full row is the main evaluation itself
    assert [r["mean"] for r in rows[5]["results"]] == [m["mean"] for m in main]


@pytest.mark.slow
def test_report_tables_carry_controls_mean_rows_and_paper_order(run):
    reports = run["root"] / "reports"
    summary = (reports / "summary.md").read_text()
    for name in ("DZAD", "control: mean_intensity", "control: laplacian", "control: feature_knn"):
        assert f"| {name} |" in summary
    per_cat = pd.read_csv(reports / "grain_image_auroc.csv", index_col=0)
    assert list(per_cat.index) == ["grain", "mean"]
    assert "control: feature_knn" in per_cat.columns and "DZAD std" in per_cat.columns
    main = [json.loads((run["eval"] / f"seed_{s}/metrics.json").read_text()) for s in (0, 1)]
    values = [m["categories"]["grain"]["image_auroc"] for m in main]
    assert per_cat.loc["grain", "DZAD"] == pytest.approx(np.mean(values))
    table4 = pd.read_csv(reports / "table4_weighting.csv", index_col=0)
    assert list(table4.index) == list(run["cfg"].ablation.weightings)
    table3 = (reports / "table3_grain.md").read_text()
    assert "| SD+SGSD+M_t+F_b+w_t |" in table3
    index = (reports / "index.md").read_text()
    for stem in ("summary", "table4_weighting", "figure4_timesteps", "table3_grain"):
        assert f"`{stem}.csv`" in index
    assert (reports / "figure4_timesteps.png").stat().st_size > 0
    assert Path("reports/index.md") in run["files"]  # returned relative to the working folder


@pytest.mark.slow
def test_regimes_stage_reports_every_regime_beside_its_control(run, tmp_path):
    """Both regimes per seed on the target's root (at regime.image_size, not the 32 px cache),
    their summaries, the DVC metrics and the report's first table, whose rows all name a regime."""
    folder = run["root"] / "runs/regimes/grain"
    for name, k, control in (
        ("batch_zero_shot", 0, "mutual"),
        ("few_shot", 4, "fewshot_patchcore"),
    ):
        per_seed = [
            json.loads((folder / f"{name}/seed_{s}/metrics.json").read_text()) for s in (0, 1)
        ]
        assert [m["protocol"]["few_shot_k"] for m in per_seed] == [k, k]
        assert per_seed[0]["counts"]["grain"]["images"] == 7 and set(per_seed[0]["controls"]) == {
            control
        }
        summary = run["regimes"][name]
        values = [m["categories"]["grain"]["pixel_auroc"] for m in per_seed]
        assert summary["dzad"]["pixel_auroc"]["mean"] == pytest.approx(np.mean(values))
        assert summary["regime"] == per_seed[0]["regime"]
    export_regimes(folder, tmp_path / "m")
    assert {p.stem for p in (tmp_path / "m").glob("*.json")} == {
        "batch_zero_shot_dzad", "batch_zero_shot_control_mutual",
        "few_shot_dzad", "few_shot_control_fewshot_patchcore",
    }  # fmt: skip
    table = pd.read_csv(run["root"] / "reports/regimes.csv", index_col=0)
    regimes = ("zero-shot: ", "batch zero-shot: ", "few-shot (K = 4): ")
    assert all(row.startswith(regimes) for row in table.index)
    assert {r for r in regimes if any(i.startswith(r) for i in table.index)} == set(regimes)
    batch = "batch zero-shot: DZAD: backbone patches + DZAD copy (frozen SOURCE model), w = 0.5"
    column = "grain: pixel_auroc"
    assert table.loc[batch, column] == pytest.approx(
        run["regimes"]["batch_zero_shot"]["dzad"]["pixel_auroc"]["mean"]
    )
    # the fusion's parts are rows too; the backbone part is the mutual control, number for number
    mutual = (
        "batch zero-shot: control: mutual scoring, MuSc recipe (backbone only, batch zero-shot)"
    )
    part = table.loc["batch zero-shot: part: backbone patches alone"]
    assert part.to_dict() == table.loc[mutual].to_dict()
    assert "few-shot (K = 4): part: DZAD copy alone" in table.index
    index = (run["root"] / "reports/index.md").read_text()
    assert index.index("`regimes.csv`") < index.index("`summary.csv`")  # the first table
    # the second: how good each regime's written decisions were, mean over seeds
    decisions = pd.read_csv(run["root"] / "reports/decisions.csv", index_col=0)
    few = "few-shot (K = 4): DZAD: backbone patches + DZAD copy (frozen SOURCE model), w = 0.5"
    per_seed = [
        json.loads((folder / f"few_shot/seed_{s}/metrics.json").read_text()) for s in (0, 1)
    ]
    recall = [m["decisions"]["categories"]["grain"]["image_recall"] for m in per_seed]
    assert decisions.loc[few, "grain: image_recall"] == pytest.approx(np.mean(recall))
    zero = [json.loads((run["eval"] / f"seed_{s}/metrics.json").read_text()) for s in (0, 1)]
    flagged = [m["decisions"]["mean"]["images_flagged"] for m in zero]
    zero_row = decisions.loc["zero-shot: DZAD (per image)", "grain: images_flagged"]
    assert zero_row == pytest.approx(np.mean(flagged))
    assert index.index("`regimes.csv`") < index.index("`decisions.csv`") < index.index("`summary")


@pytest.mark.slow
def test_dvc_exports(run, tmp_path):
    paths = export_evaluation("grain", run["eval"], tmp_path / "m.json", tmp_path / "plots")
    roc = pd.read_csv(tmp_path / "plots" / "roc_grain.csv")
    assert (
        roc["fpr"].iloc[0] == 0 and roc["tpr"].iloc[-1] == 1 and roc["fpr"].is_monotonic_increasing
    )
    assert json.loads(paths[0].read_text())["dzad"] == json.loads(
        json.dumps(run["summary"]["dzad"])
    )
    compact = tmp_path / "m"  # DVC metrics: one small file per method
    assert paths[-1] == compact
    expected = {"dzad", *(f"control_{c}" for c in run["summary"]["controls"])}
    assert {p.stem for p in compact.glob("*.json")} == expected
    dzad = json.loads((compact / "dzad.json").read_text())
    assert dzad == {m: run["summary"]["dzad"][m]["mean"] for m in COMPACT_METRICS}
    export_ablation(run["root"] / "runs/ablation", tmp_path / "a.json", tmp_path / "plots")
    bars = pd.read_csv(tmp_path / "plots" / "ablation_weighting.csv")
    assert list(bars["weighting"]) == list(run["cfg"].ablation.weightings)
    points = pd.read_csv(tmp_path / "plots" / "ablation_timesteps.csv")
    assert list(points["t_start"]) == [500, 999]


@pytest.mark.slow
def test_a_failed_evaluation_leaves_no_output_behind(run, tmp_path, monkeypatch):
    """Seed 0 evaluates, seed 1's checkpoint is corrupt: nothing of the stage's folder remains."""
    models = tmp_path / "models"
    shutil.copytree(run["root"] / "models/seed_0", models / "seed_0")
    (models / "seed_1").mkdir()
    (models / "seed_1" / "dzad.json").write_text("{not json")
    out = tmp_path / "eval" / "grain"
    monkeypatch.chdir(run["root"])  # the study's caches are relative paths
    with pytest.raises(CheckpointError, match="seed_1"):
        evaluate_seeds(run["cfg"], models, "grain", out)
    assert not out.exists() and list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------------ fast unit tests
def _fake_eval(folder: Path, seed: int, F: np.ndarray, labels: np.ndarray) -> None:
    out = folder / f"seed_{seed}"
    out.mkdir(parents=True)
    alphas = torch.linspace(0.999, 0.01, 1000).numpy()
    np.savez(
        out / "noise_features.npz",
        F=F.astype(np.float32), label=labels, category=np.array(["a"] * len(labels)),
        detection_score=np.zeros(len(labels)), stage_mean=np.zeros(F.shape[1], np.float32),
        stage_std=np.ones(F.shape[1], np.float32), weights=np.ones(F.shape[1], np.float32),
        bias=np.float64(0), standardise=np.bool_(True), alphas_cumprod=alphas,
    )  # fmt: skip
    (out / "metrics.json").write_text("{}")


def test_weighting_results_rank_by_the_weighted_stages(tmp_path):
    """Stage 0 carries the anomaly signal, the noisiest stages anti-signal: weightings that favour
    early stages (exp6) separate perfectly, the uniform one does not."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20)
    F = rng.normal(1.0, 0.05, (40, 10, 2))
    F[:, 0] += labels[:, None] * 1.0
    F[:, 5:] -= labels[:, None, None] * 0.5
    _fake_eval(tmp_path / "t", 0, F, labels)
    cfg = replace(
        config.DZADConfig(),
        ablation=replace(config.AblationConfig(), weightings=("exp6", "uniform")),
    )
    out = ablations.weighting_results(cfg, {"t": tmp_path / "t"})
    assert out["exp6"]["t"][0]["mean"]["image_auroc"] == 1.0
    assert out["uniform"]["t"][0]["mean"]["image_auroc"] < 0.2
    w = weights_by_name("exp6", 3.0, 10, torch.linspace(0.999, 0.01, 1000))
    assert float(w[0]) > float(w[-1])


def test_weighting_results_read_exactly_the_configured_seeds(tmp_path):
    """An evaluation folder holding seeds 0, 1 and 2: a run over seeds (2, 0) rescores those two,
    in that order; a configured seed without results is an error naming its folder."""
    labels = np.array([0, 1, 0, 1])
    for seed in (0, 1, 2):
        F = np.ones((4, 3, 1))
        F[:, 0, 0] += labels * (1.0 if seed == 1 else -1.0) * (seed + 1)  # seed 1 separates
        _fake_eval(tmp_path / "t", seed, F, labels)
    weightings = replace(config.AblationConfig(), weightings=("uniform",))
    cfg = replace(config.DZADConfig(), seeds=(2, 0), ablation=weightings)
    (two, zero) = ablations.weighting_results(cfg, {"t": tmp_path / "t"})["uniform"]["t"]
    assert two["mean"]["image_auroc"] == zero["mean"]["image_auroc"] == 0.0
    missing = replace(cfg, seeds=(0, 3))
    with pytest.raises(DZADInputError, match="seed 3") as err:
        ablations.weighting_results(missing, {"t": tmp_path / "t"})
    assert err.value.path == tmp_path / "t" / "seed_3" / "noise_features.npz"


def test_learned_weighting_needs_a_learned_calibration(tmp_path):
    labels = np.array([0, 1, 0, 1])
    _fake_eval(tmp_path / "t", 0, np.ones((4, 3, 1)), labels)
    cfg = replace(
        config.DZADConfig(), ablation=replace(config.AblationConfig(), weightings=("learned",))
    )
    with pytest.raises(ValueError, match="learned"):
        ablations.weighting_results(cfg, {"t": tmp_path / "t"})


def test_row_config_switches_exactly_the_ablated_parts():
    cfg = config.DZADConfig()
    sd = ablation_reruns.row_config(cfg, {"SD": True})
    assert (sd.model.use_sg, sd.noise.n_stages, sd.weighting.name, sd.anomaly_map.gating) == (
        False, 1, "uniform", "none",
    )  # fmt: skip
    full = ablation_reruns.row_config(cfg, dict.fromkeys(("SD", "SGSD", "M_t", "F_b", "w_t"), True))
    assert full == cfg
    fb = ablation_reruns.row_config(cfg, {"SD": True, "SGSD": True, "F_b": True})
    assert fb.model == cfg.model and fb.anomaly_map == cfg.anomaly_map and fb.noise.n_stages == 1


def test_mean_std_and_json_without_nan(tmp_path):
    assert mean_std([0.5, None, math.nan, 0.7]) == {
        "mean": pytest.approx(0.6), "std": pytest.approx(np.std([0.5, 0.7], ddof=1)), "n": 2,
    }  # fmt: skip
    assert mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    path = write_json(tmp_path / "m.json", {"a": math.nan, "b": np.float32(0.25)})
    assert json.loads(path.read_text()) == {"a": None, "b": 0.25}


def test_bad_study_inputs_fail_with_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.DZADConfig()
    with pytest.raises(ValueError, match="unknown target 'nope'"):
        target_cache(cfg, "nope")
    with pytest.raises(ValueError, match="must lie inside"):
        prepare_data(replace(cfg, synth=replace(cfg.synth, dest="elsewhere")))
    with pytest.raises(DZADInputError, match="seed_3"):
        checkpoints(tmp_path / "models", [3])
    with pytest.raises(DZADInputError, match="run `dzad stage evaluate`"):
        seed_results(tmp_path)


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_study_files_parse_and_name_existing_data(path):
    cfg = config.load(path)
    assert cfg.study == path.stem
    assert cfg.seeds and cfg.sets.source and cfg.sets.targets
    # `prepare` writes only under data/raw: a synth.dest elsewhere fails as soon as
    # synth.families is switched on (e.g. to train on a union with the synthetic families)
    assert Path(cfg.synth.dest).parts[:2] == ("data", "raw")
    refs = [*cfg.sets.source, *cfg.sets.targets.values()]
    external = [r for r in refs if r.root.startswith("../shared/datasets")]
    if external and not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is absent")
    from dzad.data.dataset import list_categories

    for ref in external:
        assert set(ref.categories) <= set(list_categories(REPO / ref.root))


def test_params_yaml_is_the_demo_study():
    assert config.load(REPO / "params.yaml") == config.load(REPO / "studies" / "demo.yaml")
