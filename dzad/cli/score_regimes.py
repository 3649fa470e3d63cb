"""``dzad score --batch-zero-shot`` / ``--reference DIR`` (method.md §11.1): one call = one batch.

The images of the call are loaded at ``regime.image_size`` and scored together
(:func:`dzad.regimes.score_batch`) or against the known-good images under ``--reference``
(:func:`dzad.regimes.score_few_shot`). Decisions: a numeric ``--threshold`` on the image score, or
with ``auto`` the batch's own outlier rule (image score above the median plus 3 scaled MADs of the
call's image scores) or, with ``--reference`` and ``regime.few_shot_threshold: references``, the
highest leave-one-out score of the references (:func:`dzad.regimes.image_rule`), since the
SOURCE-calibrated tau belongs to the per-image detection score. The normalised score spans the
call's own image scores. The maps (backbone distances, fused with the adapted DZAD excess) have no
calibrated map threshold either: their pictures' region and ``--save-masks`` use the call's own,
the median plus ``regime.mask_k`` scaled MADs of all its map values, or with ``--reference`` (and
``references``) the ``regime.reference_quantile`` quantile of the values of the references'
leave-one-out maps (:func:`dzad.regimes.map_level`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dzad.cli.score_inputs import ScoreInput, collect_inputs, decode_batch
from dzad.decisions import Threshold
from dzad.errors import DZADInputError
from dzad.regimes import (
    MIN_OUTLIER_SCORES,
    REGIME_LABELS,
    image_rule,
    map_level,
    map_level_rule,
    references_rule,
    score_batch,
    score_few_shot,
)


class RegimeScores(NamedTuple):
    """One call's regime scoring: its rows of ``scores.csv``, maps ``(B,h,w)``, decision rule,
    map threshold (what it is: ``map_note``) and the regime's label."""

    rows: list[dict[str, Any]]
    maps: np.ndarray
    rule: Threshold
    level: float
    map_note: str
    regime: str


def _check_batch_rule(inputs: list[ScoreInput], regime: str) -> None:
    """``--threshold auto`` decides by the call's own outlier rule here, which decides nothing for
    fewer than :data:`MIN_OUTLIER_SCORES` images: refuse rather than write arbitrary decisions."""
    if len(inputs) < MIN_OUTLIER_SCORES:
        raise DZADInputError(
            inputs[0].shown,
            f"{regime} with --threshold auto decides by the call's outlier rule, which needs at "
            f"least {MIN_OUTLIER_SCORES} images (got {len(inputs)}); pass a numeric --threshold",
        )


def score_regime(
    dzad,
    rc,
    inputs: list[ScoreInput],
    images: torch.Tensor,
    out: Path,
    reference: Path | None,
    threshold: float | None,
) -> RegimeScores:
    """``inputs`` (decoded: ``images`` ``(B,3,S,S)`` at ``rc.image_size``) scored as one batch
    (or against ``reference``)."""
    from dzad.evaluation import control_backbone

    resample = dzad.cfg.data.resample
    backbone = control_backbone(dzad)
    if reference is None:
        if len(inputs) < 2:
            raise DZADInputError(inputs[0].shown, "--batch-zero-shot needs at least 2 images")
        if threshold is None:
            _check_batch_rule(inputs, "--batch-zero-shot")
        scored, mode = score_batch(backbone, images, rc, dzad), "batch-zero-shot"
    else:
        refs, _ = collect_inputs([str(reference)], False, out)
        refs, ref_images, _ = decode_batch(refs, rc.image_size, resample, skip_bad=False)
        if not refs:
            raise DZADInputError(reference, "--reference holds no readable image")
        if threshold is None and not references_rule(rc, len(refs)):
            why = "one image" if len(refs) < 2 else "regime.few_shot_threshold: batch"
            _check_batch_rule(inputs, f"--reference with {why}")
        scored, mode = score_few_shot(backbone, images, ref_images, rc, dzad), "few-shot"
    rule = image_rule(scored.scores, threshold, scored.reference_scores)
    rows = []
    for k, item in enumerate(inputs):
        score = float(scored.scores[k])
        row = {
            "path": item.shown,
            "image_score": score,
            "detection_score": None,  # the per-image eq. 13 score is not computed here
            "decision": "anomalous" if score > rule.value else "normal",
        }
        rows.append({**row, "normalised_score": rule.normalise(score)})
    level, label = map_level(scored.maps, rc, scored.reference_maps), REGIME_LABELS[mode]
    how = map_level_rule(rc, scored.reference_maps is not None, "call")
    note = f"{label}: map threshold {level:.4g}, {how}; no labels"
    return RegimeScores(rows, scored.maps[:, 0].float().numpy(), rule, level, note, label)
