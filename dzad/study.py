"""Study stages: the one place that strings the library's steps into a study (docs/architecture.md).

The ``dzad stage ...`` commands, the DVC stages (``dvc.yaml``) and the Prefect flows all call these
functions; none of them re-implements a step. A study is the cross-dataset protocol of
method-notes 6: train on the SOURCE normals (one checkpoint per seed), evaluate on every target,
ablate, report.

Folders (the DVC outputs). Each dataset cache, checkpoint, evaluation, ablation and report folder
is built under a temporary name and swapped in whole, every file is written atomically, so a failed
stage leaves no half-written piece behind (and DVC, which records a stage only when it succeeds,
reruns it):

- ``data/raw/``: synthetic families and fetched sets, plus ``datasets.json`` (counts of every root);
- ``<data.cache_dir>/source/<i>/`` and ``<data.cache_dir>/targets/<name>/``: resized caches;
- ``models/seed_<s>/``: one checkpoint per seed;
- ``runs/eval/<target>/seed_<s>/``: evaluation outputs, ``summary.json`` (mean ± std over seeds).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dzad.config import DatasetRef, DZADConfig
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

SEED_DIR = "seed_{}"
SUMMARY = "summary.json"
DATASETS_JSON = "datasets.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ----------------------------------------------------------------------------------------- names
def source_refs(cfg: DZADConfig) -> list[DatasetRef]:
    if not cfg.sets.source:
        raise ValueError("sets.source is empty: a study needs at least one SOURCE dataset")
    return list(cfg.sets.source)


def target_ref(cfg: DZADConfig, target: str) -> DatasetRef:
    if target not in cfg.sets.targets:
        raise ValueError(f"unknown target {target!r}; sets.targets has {sorted(cfg.sets.targets)}")
    if not _NAME.fullmatch(target):
        raise ValueError(f"target name {target!r} must match {_NAME.pattern} (it names folders)")
    return cfg.sets.targets[target]


def source_cache(cfg: DZADConfig, index: int) -> Path:
    """Resized cache of the ``index``-th SOURCE dataset."""
    return Path(cfg.data.cache_dir) / "source" / str(index)


def target_cache(cfg: DZADConfig, target: str) -> Path:
    """Resized cache of one target dataset."""
    target_ref(cfg, target)
    return Path(cfg.data.cache_dir) / "targets" / target


def seed_dir(folder: str | Path, seed: int) -> Path:
    return Path(folder) / SEED_DIR.format(seed)


def with_seed(cfg: DZADConfig, seed: int) -> DZADConfig:
    return replace(cfg, seed=int(seed))


# ---------------------------------------------------------------------------------------- prepare
def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _describe(ref: DatasetRef) -> dict[str, Any]:
    """Image counts per category and split of one root (file names only; nothing is decoded)."""
    from dzad.data.dataset import iter_samples, list_categories

    root = Path(ref.root)
    known = list_categories(root)
    missing = sorted(set(ref.categories) - set(known))
    if missing:
        raise DZADInputError(root, f"categories {missing} not found; it has {known}")
    counts = {}
    for cat in ref.categories or known:
        samples = [s for split in ("train", "test") for s in iter_samples(root, cat, split)]
        counts[cat] = {
            "train": sum(s.split == "train" for s in samples),
            "test_good": sum(s.split == "test" and s.label == 0 for s in samples),
            "test_defect": sum(s.label == 1 for s in samples),
        }
    return {"root": str(root), "categories": counts}


def prepare_data(
    cfg: DZADConfig,
    *,
    raw_dir: str | Path = "data/raw",
    download_dir: str | Path = "data/downloads",
) -> dict[str, Path]:
    """Make every dataset root of the study exist; returns ``{dataset name: MVTec root}``.

    Generates ``synth.families`` (demo; none when empty) into ``synth.dest``, downloads and
    converts ``sets.fetch`` (paper; archives are kept in ``download_dir`` so an interrupted
    download resumes) into ``raw_dir/<name>``, and uses any other root where it is (shared). Writes
    ``raw_dir/datasets.json`` with the image counts of every root it checked.
    """
    from dzad.data import fetch, synth

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    s = cfg.synth
    if s.families:
        dest = Path(s.dest)
        if not _inside(dest, raw_dir):
            raise ValueError(f"synth.dest {dest} must lie inside {raw_dir} (the stage's output)")
        synth.generate(dest, s.seed, s.size, s.n_train, s.n_test_good, s.n_test_defect, s.families)
    for name in cfg.sets.fetch:
        if name not in fetch.DATASETS:
            raise ValueError(
                f"sets.fetch: unknown dataset {name!r}; known: {sorted(fetch.DATASETS)}"
            )
        spec = fetch.DATASETS[name]
        archive = fetch.download(spec.url, Path(download_dir) / spec.filename, spec.sha256)
        fetch.fetch(name, raw_dir, archive=archive)
    names = {f"source_{i}": ref for i, ref in enumerate(source_refs(cfg))}
    names.update({t: target_ref(cfg, t) for t in cfg.sets.targets})
    record = {name: _describe(ref) for name, ref in names.items()}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write_text(raw_dir / DATASETS_JSON, text)
    return {name: Path(ref.root) for name, ref in names.items()}


# ------------------------------------------------------------------------------------- preprocess
def _cache(cfg: DZADConfig, ref: DatasetRef, out: Path) -> Path:
    from dzad.data.preprocess import preprocess

    d = cfg.data
    preprocess(
        ref.root,
        ref.categories,
        out,
        d.image_size,
        d.resample,
        d.mask_threshold,
        skip_bad=d.skip_bad,
    )
    return out


def preprocess_data(
    cfg: DZADConfig, *, source: bool = True, targets: Sequence[str] | None = None
) -> dict[str, Path]:
    """Resized cache + manifest of the SOURCE datasets and of ``targets`` (None = every target).

    Returns ``{name: cached root}`` (names ``source_<i>`` and the target names). A cache whose
    inputs and parameters did not change is left as it is.
    """
    out: dict[str, Path] = {}
    if source:
        for i, ref in enumerate(source_refs(cfg)):
            out[f"source_{i}"] = _cache(cfg, ref, source_cache(cfg, i))
    for name in cfg.sets.targets if targets is None else targets:
        out[name] = _cache(cfg, target_ref(cfg, name), target_cache(cfg, name))
    return out


def cached(folder: Path, split: str, label: int | None = None) -> list:
    """Samples of a cache (``split``; ``label`` 0/1 or None for both)."""
    from dzad.data.preprocess import cached_samples

    return [
        s
        for s in cached_samples(folder)
        if s.split == split and (label is None or s.label == label)
    ]


# ------------------------------------------------------------------------------------------ train
def source_normals(cfg: DZADConfig) -> list:
    """SOURCE ``train/good`` samples of every source cache, in cache order (training's order)."""
    caches = [source_cache(cfg, i) for i in range(len(source_refs(cfg)))]
    normals = [s for c in caches for s in cached(c, "train", 0)]
    if not normals:
        raise DZADInputError(caches[0], "no SOURCE normal training images (train/good)")
    return normals


def source_labelled(cfg: DZADConfig):
    """The labelled SOURCE split (``test/``: images, labels), for learned weights / prototypes."""
    from dzad.data.dataset import ImageDataset

    caches = [source_cache(cfg, i) for i in range(len(source_refs(cfg)))]
    test = [s for c in caches for s in cached(c, "test")]
    if not test:
        raise DZADInputError(caches[0], "the labelled SOURCE split (test/) is empty")
    return ImageDataset(test, cfg.data.image_size, cfg.data), np.array([s.label for s in test])


def needs_labelled(cfg: DZADConfig) -> bool:
    return cfg.weighting.name == "learned" or cfg.detection.mode == "prototype"


def train_model(
    cfg: DZADConfig,
    out_dir: Path,
    *,
    seed: int | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[..., Any] | Any] = (),
    device: str | None = None,
):
    """eq. 8 training on the SOURCE normals + source-only calibration -> checkpoint ``out_dir``.

    Reads the caches of :func:`preprocess_data`. The learned weighting and the prototype mode also
    get the labelled SOURCE test split (source data, never the target's). Returns the
    :class:`dzad.training.TrainResult`.
    """
    from dzad.data.dataset import ImageDataset
    from dzad.training import train

    if seed is not None:
        cfg = with_seed(cfg, seed)
    if device is not None:
        cfg = replace(cfg, train=replace(cfg.train, device=device))
    images = ImageDataset(source_normals(cfg), cfg.data.image_size, cfg.data)
    labelled = source_labelled(cfg) if needs_labelled(cfg) else None
    return train(cfg, images, out_dir, resume, callbacks, labelled=labelled, progress=False)


def train_seeds(cfg: DZADConfig, models_dir: str | Path, **kwargs: Any) -> dict[int, Any]:
    """:func:`train_model` once per ``cfg.seeds`` into ``models_dir/seed_<s>``."""
    return {s: train_model(cfg, seed_dir(models_dir, s), seed=s, **kwargs) for s in cfg.seeds}


def checkpoints(models: str | Path, seeds: Sequence[int]) -> dict[int, Path]:
    """``{seed: checkpoint}`` of a models folder (``seed_<s>/``) or of one checkpoint folder."""
    models = Path(models)
    if (models / "dzad.json").is_file():
        return {int(seeds[0]): models}
    found = {int(s): seed_dir(models, s) for s in seeds}
    for s, path in found.items():
        if not (path / "dzad.json").is_file():
            raise DZADInputError(path, f"no checkpoint for seed {s}: run `dzad stage train` first")
    return found


# --------------------------------------------------------------------------------------- evaluate
INFERENCE_SECTIONS = ("reconstruction", "anomaly_map", "evaluate")


def load_model(ckpt: str | Path, cfg: DZADConfig, device: str | None = None):
    """The checkpoint's :class:`~dzad.model.DZAD` with the study's inference-time settings.

    Training-time sections (model, train, noise bank, weighting, detection) are the checkpoint's:
    they are baked into its weights and calibration. ``reconstruction``, ``anomaly_map``,
    ``evaluate`` and ``noise.max_batch`` come from ``cfg``, so changing them needs no retraining.
    """
    from dzad.model import DZAD

    m = cfg.anomaly_map
    model = DZAD.from_checkpoint(
        ckpt,
        backbone_override=m.backbone,
        random_backbone=m.random_backbone,
        map_location=device or _device(cfg),
    )
    trained = model.cfg
    for name in ("model", "weighting", "detection"):
        if getattr(trained, name) != getattr(cfg, name):
            log.warning(
                "%s: its %s settings differ from the study's; using the checkpoint's", ckpt, name
            )
    model.cfg = replace(
        trained,
        **{name: getattr(cfg, name) for name in INFERENCE_SECTIONS},
        noise=replace(trained.noise, max_batch=cfg.noise.max_batch),
        data=replace(trained.data, skip_bad=cfg.data.skip_bad),
    )
    return model


def _device(cfg: DZADConfig) -> str:
    import torch

    if cfg.train.device != "auto":
        return cfg.train.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def source_control_batches(cfg: DZADConfig, image_size: int) -> Callable[[], Any]:
    """``source()`` for :func:`dzad.evaluation.build_controls`: SOURCE normals from the caches."""
    from dzad.evaluation import source_batches

    refs = [DatasetRef(str(source_cache(cfg, i))) for i in range(len(source_refs(cfg)))]
    return lambda: source_batches(refs, image_size, cfg.data, cfg.evaluate.batch_size)


def evaluate_model(model, cfg: DZADConfig, target: str, out_dir: Path, *, controls: bool) -> dict:
    """:func:`dzad.evaluation.evaluate` of a built model on one target's cache (atomic folder)."""
    from dzad.evaluation import build_controls, evaluate

    ctrl = None
    if controls:
        ctrl = build_controls(
            model, model.cfg.evaluate, source_control_batches(cfg, model.image_size)
        )
    with atomic_dir(out_dir) as tmp:
        result = evaluate(
            model, target_cache(cfg, target), (), tmp, model.cfg.evaluate, ctrl,
            skip_bad=cfg.data.skip_bad,
        )  # fmt: skip
    return result


def evaluate_target(
    ckpt: Path, cfg: DZADConfig, target: str, out_dir: Path, *, controls: bool | None = None
) -> dict:
    """Evaluate one checkpoint on one target (method-notes 6); returns ``metrics.json``'s content.

    ``out_dir`` gets ``metrics.json``, ``metrics.csv``, ``scores.csv``, ``noise_features.npz`` and
    ``figures/``. ``controls`` None = ``cfg.evaluate.controls``.
    """
    model = load_model(ckpt, cfg)
    use = cfg.evaluate.controls if controls is None else controls
    return evaluate_model(model, cfg, target, Path(out_dir), controls=use)


def evaluate_seeds(cfg: DZADConfig, models: str | Path, target: str, out_dir: str | Path) -> dict:
    """:func:`evaluate_target` for every seed's checkpoint into ``out_dir/seed_<s>``.

    Controls are scored with every seed (same images, same metric code). Writes and returns
    ``out_dir/summary.json`` (:func:`summarise`).
    """
    ckpts = checkpoints(models, cfg.seeds)
    with atomic_dir(out_dir) as tmp:
        results = {
            s: evaluate_target(ck, with_seed(cfg, s), target, seed_dir(tmp, s))
            for s, ck in ckpts.items()
        }
        summary = summarise(target, results)
        write_json(tmp / SUMMARY, summary)
    return summary


def seed_file(eval_dir: str | Path, seed: int, name: str) -> Path:
    """``eval_dir/seed_<seed>/<name>``; :class:`DZADInputError` naming it when it is missing."""
    path = seed_dir(eval_dir, seed) / name
    if not path.is_file():
        raise DZADInputError(
            path, f"no evaluation output for seed {seed}: run `dzad stage evaluate` with this seed"
        )
    return path


def seed_result(eval_dir: str | Path, seed: int) -> dict:
    """``metrics.json`` of one seed's evaluation (``eval_dir/seed_<seed>/``)."""
    return json.loads(seed_file(eval_dir, seed, "metrics.json").read_text())


def seed_results(eval_dir: str | Path) -> dict[int, dict]:
    """``{seed: metrics.json}`` of an evaluation folder (``seed_<s>/`` subfolders)."""
    eval_dir = Path(eval_dir)
    found = sorted(eval_dir.glob(SEED_DIR.format("*")), key=lambda p: int(p.name.split("_")[1]))
    if not found:
        raise DZADInputError(eval_dir, "no seed_<s>/ evaluation folders: run `dzad stage evaluate`")
    return {int(p.name.split("_")[1]): json.loads((p / "metrics.json").read_text()) for p in found}


# ------------------------------------------------------------------------------------- summaries
KEY_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` over the finite values; std is the sample std (None for n < 2)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], float)
    mean = float(x.mean()) if x.size else None
    std = float(x.std(ddof=1)) if x.size > 1 else None
    return {"mean": mean, "std": std, "n": int(x.size)}


def _block_summary(blocks: Sequence[dict], metrics: Sequence[str]) -> dict:
    return {m: mean_std([b.get("mean", {}).get(m) for b in blocks]) for m in metrics}


def summarise(target: str, results: dict[int, dict]) -> dict:
    """DVC metrics of one target: mean ± std over seeds of the macro means (DZAD, its score
    variants, every control) and the per-category DZAD means."""
    runs = list(results.values())
    out: dict[str, Any] = {"target": target, "seeds": sorted(results)}
    out["dzad"] = _block_summary(runs, KEY_METRICS)
    for name in runs[0].get("variants", {}):
        out[f"dzad_{name}"] = _block_summary([r["variants"][name] for r in runs], ("image_auroc",))
    out["controls"] = {
        name: _block_summary(
            [r["controls"][name] for r in runs if name in r["controls"]], KEY_METRICS
        )
        for name in runs[0].get("controls", {})
    }
    cats = runs[0]["categories"]
    out["categories"] = {
        c: {
            m: mean_std([r["categories"].get(c, {}).get(m) for r in runs])["mean"]
            for m in KEY_METRICS
        }
        for c in cats
    }
    return out


def curve_points(eval_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Image-level ROC ``(fpr, tpr)`` and PR ``(recall, precision)`` points of the first seed's
    image score, pooled over the target's categories (the per-category curves are PNG figures)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    first = min(seed_results(eval_dir))
    scores = pd.read_csv(seed_dir(eval_dir, first) / "scores.csv")
    y, s = scores["label"].to_numpy(), scores["image_score"].to_numpy()
    if y.min() == y.max():
        raise DZADInputError(eval_dir, "one class only: no ROC/PR curve")
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    roc = pd.DataFrame({"fpr": fpr, "tpr": tpr})
    pr = pd.DataFrame({"recall": recall[::-1], "precision": precision[::-1]})
    return roc, pr


def export_evaluation(
    target: str, eval_dir: str | Path, metrics_file: str | Path, plots_dir: str | Path
) -> list[Path]:
    """``metrics_file`` (the target's summary) and ``plots_dir/{roc,pr}_<target>.csv`` for DVC."""
    summary = json.loads((Path(eval_dir) / SUMMARY).read_text())
    roc, pr = curve_points(eval_dir)
    plots_dir = Path(plots_dir)
    return [
        write_json(metrics_file, summary),
        atomic_write_text(
            plots_dir / f"roc_{target}.csv", roc.to_csv(index=False, float_format="%.6g")
        ),
        atomic_write_text(
            plots_dir / f"pr_{target}.csv", pr.to_csv(index=False, float_format="%.6g")
        ),
    ]


# ----------------------------------------------------------------------------------------- ablate
ABLATION_JSON = "ablation.json"


def ablate(cfg: DZADConfig, ckpt: Path, eval_dirs: dict[str, Path], out_dir: Path) -> pd.DataFrame:
    """Table 4 (rescored from the stored noise features: no model run), Figure 4 (``t_start``
    reruns) and, with ``ablation.architecture``, Table 3 (:mod:`dzad.ablation`).

    ``ckpt``: the models folder (``seed_<s>/``) or one checkpoint; ``eval_dirs``: ``{target:
    evaluation folder of evaluate_seeds}``. Writes ``out_dir/ablation.json`` (per-seed results)
    and ``ablation.csv``; returns that long table (one row per ablation, setting, target, seed).
    """
    from dzad import ablation

    ckpts = checkpoints(ckpt, cfg.seeds)
    cfg = replace(cfg, seeds=tuple(ckpts))  # one checkpoint: its seed only, as evaluate_seeds
    a = cfg.ablation
    with atomic_dir(out_dir) as tmp:
        record = {
            "weighting": ablation.weighting_results(cfg, eval_dirs) if a.weightings else {},
            "timesteps": ablation.timestep_results(cfg, ckpts, eval_dirs, tmp / "timesteps")
            if a.t_starts
            else {},
            "architecture": ablation.architecture_results(
                cfg, ckpts, eval_dirs, tmp / "architecture"
            )
            if a.architecture
            else {},
        }
        write_json(tmp / ABLATION_JSON, record)
        frame = ablation.long_frame(record)
        atomic_write_text(tmp / "ablation.csv", frame.to_csv(index=False, float_format="%.6g"))
    return frame


def export_ablation(
    ablation_dir: str | Path, metrics_file: str | Path, plots_dir: str | Path
) -> list[Path]:
    """``metrics_file`` (means over seeds) and ``plots_dir/ablation_<kind>.csv`` for DVC."""
    from dzad import ablation

    frame = pd.read_csv(Path(ablation_dir) / "ablation.csv", dtype={"setting": str})
    paths = [write_json(metrics_file, ablation.dvc_metrics(frame))]
    for kind, df in ablation.plot_frames(frame).items():
        path = Path(plots_dir) / f"ablation_{kind}.csv"
        paths.append(atomic_write_text(path, df.to_csv(index=False, float_format="%.6g")))
    return paths


# ----------------------------------------------------------------------------------------- report
VARIANT_LABELS = {"detection_score": "DZAD (detection score s)", "fusion": "DZAD (rank fusion)"}


def _roc_figure(eval_dir: Path, target: str, path: Path) -> Path:
    from dzad.reports import plot_roc_curves

    first = min(seed_results(eval_dir))
    scores = pd.read_csv(seed_dir(eval_dir, first) / "scores.csv")
    curves = {
        str(c): (g["label"].to_numpy(), g["image_score"].to_numpy())
        for c, g in scores.groupby("category", sort=False)
    }
    return plot_roc_curves(curves, path, title=f"{target}: image-level ROC (seed {first})")


def report(
    cfg: DZADConfig, eval_dirs: dict[str, Path], ablation_dir: Path, out_dir: Path
) -> list[Path]:
    """The study's tables in the paper's layout (Markdown + CSV, control columns/rows beside
    DZAD) and PNG figures in ``out_dir``, plus ``index.md`` holding them all; returns the files.

    Per target: ``<target>_<metric>.*`` (rows = categories + mean, columns = DZAD and controls).
    ``summary.*`` (issue-9 layout), ``table4_weighting.*``, ``figure4_timesteps.*`` and
    ``table3_<target>.*`` when those ablations ran.
    """
    from dzad import ablation, reports

    sections: list[tuple[str, str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        runs_by_target = {}
        for target, eval_dir in eval_dirs.items():
            results = list(seed_results(eval_dir).values())
            runs_by_target[target] = {"DZAD": results}
            variants = {
                VARIANT_LABELS.get(v, f"DZAD ({v})"): [r["variants"][v] for r in results]
                for v in results[0].get("variants", {})
            }
            for metric in KEY_METRICS:
                runs = {"DZAD": results, **(variants if metric.startswith("image") else {})}
                stem = f"{target}_{metric}"
                reports.auroc_table(runs, metric).write(tmp, stem)
                sections.append((f"{target}: {metric} per category", stem, None))
            figure = _roc_figure(Path(eval_dir), target, tmp / f"{target}_roc.png")
            sections.append((f"{target}: ROC curves", "", figure.name))
        reports.summary_table(runs_by_target).write(tmp, "summary")
        sections.insert(0, ("Summary: macro means over categories", "summary", None))
        record = json.loads((Path(ablation_dir) / ABLATION_JSON).read_text())
        if record["weighting"]:
            table = reports.weighting_table(record["weighting"])
            order = [w for w in cfg.ablation.weightings if w in record["weighting"]]  # paper rows
            std = None if table.std is None else table.std.reindex(order)
            table = reports.Table(table.mean.reindex(order), std)
            table.write(tmp, "table4_weighting")
            reports.plot_weighting_bars(
                table, tmp / "table4_weighting.png", "detection-score image AUROC"
            )
            sections.append(
                (
                    "Table 4: weight functions (detection score s, image AUROC)",
                    "table4_weighting",
                    "table4_weighting.png",
                )
            )
        if record["timesteps"]:
            table = ablation.timesteps_table(record["timesteps"])
            table.write(tmp, "figure4_timesteps")
            ablation.plot_timesteps(table, tmp / "figure4_timesteps.png")
            sections.append(
                (
                    "Figure 4: reconstruction start timestep",
                    "figure4_timesteps",
                    "figure4_timesteps.png",
                )
            )
        for target, rows in record["architecture"].items():
            rows_in = [(row["flags"], row["results"]) for row in rows]
            reports.ablation_table(rows_in).write(tmp, f"table3_{target}")
            sections.append(
                (
                    f"Table 3: architecture ({target}; cls = image, seg = pixel AUROC)",
                    f"table3_{target}",
                    None,
                )
            )
        atomic_write_text(tmp / "index.md", _index(cfg, tmp, sections))
    return sorted(p for p in Path(out_dir).rglob("*") if p.is_file())


def _index(cfg: DZADConfig, folder: Path, sections: list[tuple[str, str, Any]]) -> str:
    sources = ", ".join(f"{r.root} {list(r.categories) or '(all)'}" for r in cfg.sets.source)
    lines = [
        f"# Study `{cfg.study}`",
        "",
        f"Source (training normals): {sources}. Targets: {', '.join(cfg.sets.targets)}. "
        f"Seeds: {list(cfg.seeds)} (cells: mean ± sample std over seeds). "
        f"Model: {cfg.model.profile} profile, {cfg.model.latent} latent, {cfg.train.steps} steps.",
        "",
    ]
    for title, stem, figure in sections:
        lines += [f"## {title}", ""]
        if stem:
            lines += [(folder / f"{stem}.md").read_text(), f"CSV: `{stem}.csv`", ""]
        if figure:
            lines += [f"![{title}]({figure})", ""]
    return "\n".join(lines)


def jsonable(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (DVC reads standard JSON only)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text)
