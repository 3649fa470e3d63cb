"""``dzad stage ...``: the study stages that ``dvc.yaml`` runs (``dzad.study`` does the work).

Every command reads the params file once and calls one :mod:`dzad.study` function; the Prefect flows
call the same functions. Paths default to the folders ``dvc.yaml`` declares as outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dzad.cli._app import app, clean_errors, load_config

stage = typer.Typer(
    help="Study stages (what `dvc repro` runs): prepare -> preprocess -> train -> evaluate, "
    "regimes -> ablate -> report.",
    no_args_is_help=True,
)
app.add_typer(stage, name="stage")

PARAMS = typer.Option(Path("params.yaml"), "--params", help="study params file (params.yaml)")
MODELS = typer.Option(Path("models"), "--models", help="folder of seed_<s>/ checkpoints")
EVAL_ROOT = typer.Option(Path("runs/eval"), "--eval-root", help="folder of <target>/ evaluations")
PLOTS = typer.Option(Path("plots"), "--plots", help="folder of the DVC plot CSVs")
METRICS = typer.Option(Path("metrics"), "--metrics", help="folder of DVC metrics")


def _done(what: str, t0: float) -> None:
    typer.echo(f"{what} ({time.perf_counter() - t0:.1f} s)")


@stage.command("prepare")
@clean_errors
def prepare_cmd(
    params: Path = PARAMS,
    out: Path = typer.Option(Path("data/raw"), "--out", help="generated / fetched datasets"),
    downloads: Path = typer.Option(Path("data/downloads"), "--downloads", help="archives (kept)"),
) -> None:
    """Generate the synthetic families, download the public sets, check every dataset root."""
    from dzad.study.data import DATASETS_JSON, prepare_data

    t0 = time.perf_counter()
    roots = prepare_data(load_config(params), raw_dir=out, download_dir=downloads)
    for name, root in roots.items():
        typer.echo(f"{name}: {root}")
    _done(f"prepared -> {out / DATASETS_JSON}", t0)


@stage.command("preprocess")
@clean_errors
def preprocess_cmd(
    params: Path = PARAMS,
    source: bool = typer.Option(False, "--source", help="cache the SOURCE datasets"),
    target: list[str] = typer.Option([], "--target", help="cache this target (repeatable)"),
) -> None:
    """Resized cache + manifest of the SOURCE datasets and / or of targets."""
    from dzad.study.data import preprocess_data

    if not source and not target:
        raise typer.BadParameter("give --source and/or --target NAME")
    t0 = time.perf_counter()
    out = preprocess_data(load_config(params), source=source, targets=target)
    for name, root in out.items():
        typer.echo(f"{name}: {root}")
    _done("preprocessed", t0)


@stage.command("train")
@clean_errors
def train_cmd(
    params: Path = PARAMS,
    out: Path = typer.Option(Path("models"), "--out", help="folder of seed_<s>/ checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue interrupted checkpoints"),
) -> None:
    """Train one checkpoint per seed on the SOURCE normals (eq. 8) and calibrate it."""
    from dzad.study.seed_training import train_seeds

    t0 = time.perf_counter()
    for seed, r in train_seeds(load_config(params), out, resume=resume).items():
        loss = r.losses[-1] if r.losses else float("nan")
        typer.echo(
            f"seed {seed}: {r.checkpoint} ({r.steps} steps, last loss {loss:.4f}, "
            f"{r.images_per_second:.1f} images/s)"
        )
    _done("trained", t0)


@stage.command("evaluate")
@clean_errors
def evaluate_cmd(
    target: str = typer.Option(..., "--target", help="a name under sets.targets"),
    params: Path = PARAMS,
    models: Path = MODELS,
    eval_root: Path = EVAL_ROOT,
    metrics: Path = METRICS,
    plots: Path = PLOTS,
) -> None:
    """Evaluate every seed's checkpoint on one target; write DVC metrics and ROC/PR points."""
    from dzad.study.seed_evaluation import evaluate_seeds, export_evaluation

    t0 = time.perf_counter()
    cfg = load_config(params)
    summary = evaluate_seeds(cfg, models, target, eval_root / target)
    export_evaluation(target, eval_root / target, metrics / f"eval_{target}.json", plots)
    d = summary["dzad"]
    typer.echo(
        f"{target}: image AUROC {d['image_auroc']['mean']}, pixel AUROC "
        f"{d['pixel_auroc']['mean']} (mean over {len(summary['seeds'])} seed(s))"
    )
    _done(f"evaluated -> {eval_root / target}", t0)


@stage.command("regimes")
@clean_errors
def regimes_cmd(
    target: str = typer.Option(..., "--target", help="a name under sets.targets"),
    params: Path = PARAMS,
    models: Path = MODELS,
    out_root: Path = typer.Option(
        Path("runs/regimes"), "--out-root", help="folder of <target>/ regime evaluations"
    ),
    metrics: Path = METRICS,
) -> None:
    """Batch zero-shot and few-shot (K = regime.few_shot_k) on one target, with their controls."""
    from dzad.study.seed_regimes import evaluate_regimes, export_regimes

    t0 = time.perf_counter()
    summaries = evaluate_regimes(load_config(params), models, target, out_root / target)
    export_regimes(out_root / target, metrics / f"regimes_{target}")
    for summary in summaries.values():
        d = summary["dzad"]
        typer.echo(
            f"{target}, {summary['regime']}: image AUROC {d['image_auroc']['mean']}, "
            f"pixel AUROC {d['pixel_auroc']['mean']} (mean over {len(summary['seeds'])} seed(s))"
        )
    _done(f"regimes -> {out_root / target}", t0)


@stage.command("ablate")
@clean_errors
def ablate_cmd(
    params: Path = PARAMS,
    models: Path = MODELS,
    eval_root: Path = EVAL_ROOT,
    out: Path = typer.Option(Path("runs/ablation"), "--out"),
    metrics: Path = typer.Option(Path("metrics/ablation.json"), "--metrics"),
    plots: Path = PLOTS,
) -> None:
    """Table 4 (rescored weight functions), Figure 4 (t_start) and Table 3 (if enabled)."""
    from dzad.study.ablations import ablate, export_ablation

    t0 = time.perf_counter()
    cfg = load_config(params)
    eval_dirs = {t: eval_root / t for t in cfg.sets.targets}
    frame = ablate(cfg, models, eval_dirs, out)
    export_ablation(out, metrics, plots)
    typer.echo(f"{len(frame)} ablation results -> {out}")
    _done("ablated", t0)


@stage.command("report")
@clean_errors
def report_cmd(
    params: Path = PARAMS,
    eval_root: Path = EVAL_ROOT,
    ablation: Path = typer.Option(Path("runs/ablation"), "--ablation"),
    regimes_root: Path = typer.Option(
        Path("runs/regimes"), "--regimes-root", help="folder of <target>/ regime evaluations"
    ),
    out: Path = typer.Option(Path("reports"), "--out"),
) -> None:
    """AUROC tables (paper layout, controls beside DZAD) and figures; prints where they are."""
    from dzad.study.report_folder import report

    t0 = time.perf_counter()
    cfg = load_config(params)
    eval_dirs = {t: eval_root / t for t in cfg.sets.targets}
    regime_dirs = {t: regimes_root / t for t in cfg.sets.targets}
    files = report(cfg, eval_dirs, ablation, out, regime_dirs)
    typer.echo(f"{len(files)} files; all tables: {out / 'index.md'}")
    _done("reported", t0)
