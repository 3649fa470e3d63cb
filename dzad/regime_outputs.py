"""What a regime evaluation writes (:func:`dzad.regime_evaluation.evaluate_regime`): the rows of
``scores.csv`` per scored batch, the pictures and ``report.html`` of the regime's fused maps, and
the files.

``scores.csv`` has one row per image (and draw) with the columns :data:`SCORE_COLUMNS` (the image
score under the name the per-image evaluation and ``dzad score`` use) and, with pictures, the
picture files; a row's decision is its scored batch's own outlier rule, or in few-shot its
references' highest leave-one-out score (:func:`dzad.regimes.image_rule`). The pictures get one
colour scale per scored batch starting at its label-free map threshold
(:func:`dzad.regimes.map_level`: the batch's outlier rule, or in few-shot a quantile of the
references' leave-one-out map values). Every file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dzad.config import RegimeConfig
from dzad.data.dataset import Sample
from dzad.evaluation_outputs import metrics_frame
from dzad.evaluation_pictures import EvalPictures
from dzad.io_utils import atomic_write_text
from dzad.regimes import IMAGE_OUTLIER_K, REGIME_LABELS, Scored, image_rule, map_level_rule
from dzad.run_panels import FILES as PICTURE_FILES

SCORE_COLUMNS = ("path", "label", "draw", "image_score", "decision")


def score_rows(
    samples: Sequence[Sample], labels: torch.Tensor, draw: int | str, scores: torch.Tensor,
    reference_scores: torch.Tensor | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of ``scores.csv`` for one scored batch (``labels``, ``scores``: ``(n,)``; ``draw``:
    the few-shot reference draw, ``""`` in batch zero-shot; ``reference_scores``: few-shot's
    leave-one-out scores, the decision's threshold when given, :func:`dzad.regimes.image_rule`);
    ``normalised_score`` and ``category`` / ``defect`` are for its pictures and report."""
    rule = image_rule(scores, references=reference_scores)
    rows = []
    for s, y, score in zip(samples, labels.tolist(), scores.tolist(), strict=True):
        decision = "anomalous" if score > rule.value else "normal"
        rows.append(
            {"path": str(s.path), "label": int(y), "draw": draw, "image_score": score,
             "decision": decision, "normalised_score": rule.normalise(score),
             "category": s.category, "defect": s.defect}
        )  # fmt: skip
    return rows


def regime_pictures(
    root: Path, rc: RegimeConfig, mode: str, mask_threshold: int, save_masks: bool
) -> EvalPictures:
    """The pictures of a regime evaluation: what its report states about decisions and maps."""
    decision = (
        f"image score > median + {IMAGE_OUTLIER_K:g} scaled MADs of the image scores of its "
        "scored batch (no labels)"
    )
    level = map_level_rule(rc, False)
    if mode == "few-shot" and rc.few_shot_threshold == "references":
        decision = (
            "image score > the highest leave-one-out image score of its references (each "
            f"scored against the others; with one reference: {decision})"
        )
        level = f"{map_level_rule(rc, True)} (with one reference: {level})"
    settings = {
        "regime": REGIME_LABELS[mode],
        "decision": decision,
        "normalised score": "0.5 at the decision threshold, spanning its batch's image scores",
        "heat maps": "the regime's fused map; one colour scale per scored batch, from its map "
        f"threshold: {level}; no labels",
    }
    if mode == "few-shot":
        settings["pictures"] = f"reference draw 0 of {rc.few_shot_draws}"
    return EvalPictures(root, "image_score", save_masks, mask_threshold, settings)


def add_pictures(
    pics: EvalPictures | None, samples: Sequence[Sample], rows: list[dict[str, Any]],
    scored: Scored, level: float, shown: list[dict[str, Any]],
) -> None:  # fmt: skip
    """One scored batch's pictures (of ``scored.maps`` ``(n,1,S,S)``) on its own scale from its
    map threshold ``level`` (:func:`dzad.regimes.map_level`); their rows join ``shown``."""
    if pics is None:
        return
    pics.new_scale(level)
    pics.add(samples, rows, scored.maps[:, 0].float().numpy())
    shown += rows


def write_regime_outputs(
    out_dir: Path, result: dict[str, Any], rows: list[dict[str, Any]],
    pics: EvalPictures | None, shown: list[dict[str, Any]],
) -> None:  # fmt: skip
    """The pictures and ``report.html`` (of the ``shown`` rows), ``metrics.csv``, ``scores.csv``
    and, last, ``metrics.json`` (``result``) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if pics is not None:
        pics.finish(out_dir, shown, result)
    atomic_write_text(out_dir / "metrics.csv", metrics_frame(result).to_csv(index=False))
    columns = [*SCORE_COLUMNS, *(PICTURE_FILES if pics else ())]
    table = pd.DataFrame.from_records(rows, columns=columns)
    atomic_write_text(out_dir / "scores.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1, allow_nan=False))
