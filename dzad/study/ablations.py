"""The ablation folder of a study (``ablate``): the per-seed results of :mod:`dzad.ablation`, and
the metrics and plot points DVC reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from dzad.config import DZADConfig
from dzad.io_utils import atomic_dir, atomic_write_text
from dzad.study.layout import checkpoints
from dzad.study.summaries import write_json

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
