"""The report folder of a study (``report``): AUROC tables in the paper's layout (Markdown + CSV),
PNG figures and ``index.md`` holding them all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dzad.config import DZADConfig
from dzad.io_utils import atomic_dir, atomic_write_text
from dzad.study.ablations import ABLATION_JSON, plot_timesteps, timesteps_table
from dzad.study.seed_evaluation import first_seed_scores, seed_results
from dzad.study.seed_regimes import regime_results
from dzad.study.summaries import KEY_METRICS

if TYPE_CHECKING:
    from dzad.reports import Table

VARIANT_LABELS = {
    "map_score": "DZAD (map score)",
    "detection_score": "DZAD (detection score s)",
    "fusion": "DZAD (rank fusion)",
}


def _roc_figure(eval_dir: Path, target: str, path: Path) -> Path:
    from dzad.reports import plot_roc_curves

    first, scores = first_seed_scores(eval_dir)
    curves = {
        str(c): (g["label"].to_numpy(), g["image_score"].to_numpy())
        for c, g in scores.groupby("category", sort=False)
    }
    return plot_roc_curves(curves, path, title=f"{target}: image-level ROC (seed {first})")


# each signal of a fused regime alone (the ablation of its fusion); a backbone-only regime has one
REGIME_PARTS = {
    "backbone": "part: backbone patches alone",
    "dzad": "part: DZAD copy alone",
}


def _regime_method(result: dict[str, Any]) -> str:
    """What the regime row scored with: honest about whether a DZAD signal is in it."""
    rc = result["protocol"]["settings"]
    if rc["dzad_weight"] <= 0:
        return "backbone patches only (regime.dzad_weight = 0: no DZAD signal)"
    copy = f"adapted {rc['adapt_steps']} steps" if rc["adapt_steps"] else "frozen SOURCE model"
    return f"DZAD: backbone patches + DZAD copy ({copy}), w = {rc['dzad_weight']:g}"


def _regime_label(result: dict[str, Any]) -> str:
    k = result["protocol"]["few_shot_k"]
    return f"{result['regime']} (K = {k})" if k else result["regime"]


def regime_runs(eval_dir: Path, regime_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Row label -> per-seed results: per-image zero-shot DZAD and its controls, then each regime
    and its controls; every label starts with its regime so no row can be read without it."""
    zero = list(seed_results(eval_dir).values())
    runs: dict[str, list[dict[str, Any]]] = {"zero-shot: DZAD (per image)": zero}
    for name in zero[0].get("controls", {}):
        runs[f"zero-shot: control: {name}"] = [r["controls"][name] for r in zero]
    for results in regime_results(regime_dir).values():
        regime = _regime_label(results[0])
        runs[f"{regime}: {_regime_method(results[0])}"] = results
        parts = results[0].get("variants", {})
        if len(parts) > 1:  # a fused regime: each signal alone
            for name in parts:
                label = REGIME_PARTS.get(name, f"part: {name}")
                runs[f"{regime}: {label}"] = [r["variants"][name] for r in results]
        for name, block in results[0]["controls"].items():
            runs[f"{regime}: {block['label']}"] = [r["controls"][name] for r in results]
    return runs


def regimes_table(eval_dirs: dict[str, Path], regime_dirs: dict[str, Path]) -> Table:
    """``reports/regimes.md``'s table: columns ``<target>: <metric>`` (macro means over categories,
    ± std over seeds), rows :func:`regime_runs` (zero-shot, then each regime, with controls).
    ``eval_dirs`` / ``regime_dirs``: ``{target: folder}`` of ``evaluate_seeds`` /
    ``evaluate_regimes``."""
    from dzad import reports

    runs = {t: regime_runs(eval_dirs[t], d) for t, d in regime_dirs.items()}
    return reports.summary_table(runs, controls=False)


DECISION_COLUMNS = (
    "images_flagged", "image_precision", "image_recall", "pixel_precision", "pixel_recall",
    "pixel_iou",
)  # fmt: skip


def decisions_table(eval_dirs: dict[str, Path], regime_dirs: dict[str, Path]) -> Table:
    """``reports/decisions.md``: how good each regime's written decisions were (``metrics.json``'s
    ``decisions``, :mod:`dzad.decision_quality`): the DZAD rows of :func:`regime_runs` (the only
    ones with decisions), columns ``<target>: <metric>`` (macro means over categories, ± std over
    seeds)."""
    from dzad import reports

    runs = {
        t: {
            label: [r["decisions"] for r in results]
            for label, results in regime_runs(eval_dirs[t], d).items()
            if "decisions" in results[0]
        }
        for t, d in regime_dirs.items()
    }
    return reports.summary_table(runs, DECISION_COLUMNS, controls=False)


def report(
    cfg: DZADConfig,
    eval_dirs: dict[str, Path],
    ablation_dir: Path,
    out_dir: Path,
    regime_dirs: dict[str, Path] | None = None,
) -> list[Path]:
    """The study's tables in the paper's layout (Markdown + CSV, control columns/rows beside
    DZAD) and PNG figures in ``out_dir``, plus ``index.md`` holding them all; returns the files.

    Per target: ``<target>_<metric>.*`` (rows = categories + mean, columns = DZAD and controls).
    ``regimes.*`` (the three regimes side by side, first in ``index.md``) and ``decisions.*``
    (:func:`decisions_table`) when ``regime_dirs`` (``{target: folder of evaluate_regimes}``) is
    given, ``summary.*`` (real-image study layout),
    ``table4_weighting.*``, ``figure4_timesteps.*`` and ``table3_<target>.*`` when those
    ablations ran.
    """
    from dzad import reports

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
        if regime_dirs:
            regimes_table(eval_dirs, regime_dirs).write(tmp, "regimes")
            decisions_table(eval_dirs, regime_dirs).write(tmp, "decisions")
            title = "The three scoring regimes: macro means over categories (each row its regime)"
            sections.insert(0, (title, "regimes", None))
            title = "How good each regime's written decisions and predicted regions were"
            sections.insert(1, (title, "decisions", None))
        if _write_undefined(runs_by_target, tmp):
            sections.insert(1, ("Undefined metrics (n/a in the tables) and why", "undefined", None))
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
            table = timesteps_table(record["timesteps"])
            table.write(tmp, "figure4_timesteps")
            plot_timesteps(table, tmp / "figure4_timesteps.png")
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


def _write_undefined(runs_by_target: dict[str, dict[str, list]], folder: Path) -> bool:
    """``undefined.md|csv``: each metric that is undefined (n/a) for a target's category and the
    reason (e.g. a defects-only category has no image AUROC); False when there is none."""
    import pandas as pd

    rows = [
        {"target": t, "category": c, "metric": m, "reason": why}
        for t, runs in runs_by_target.items()
        for c, reasons in runs["DZAD"][0].get("skipped", {}).get("metrics", {}).items()
        for m, why in reasons.items()
    ]
    if not rows:
        return False
    frame = pd.DataFrame(rows)
    atomic_write_text(folder / "undefined.csv", frame.to_csv(index=False))
    atomic_write_text(folder / "undefined.md", frame.to_markdown(index=False) + "\n")
    return True


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
