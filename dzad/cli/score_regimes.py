"""``dzad score --batch-zero-shot`` / ``--reference DIR`` (method.md §11.1): one call = one batch.

The images of the call are loaded at ``regime.image_size`` and scored together
(:func:`dzad.regimes.score_batch`) or against the known-good images under ``--reference``
(:func:`dzad.regimes.score_few_shot`). Decisions: a numeric ``--threshold`` on the image score, or
with ``auto`` the batch's own outlier rule (image score above the median plus 3 scaled MADs of the
call's image scores), since the SOURCE-calibrated tau belongs to the per-image detection score.
The normalised score spans the call's own image scores; the maps (backbone distances, fused with
the adapted DZAD excess) have no calibrated map threshold, so their pictures show no region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dzad.cli.score_inputs import ScoreInput, collect_inputs, decode_batch
from dzad.decisions import Threshold
from dzad.errors import DZADInputError
from dzad.regimes import REGIME_LABELS, score_batch, score_few_shot


def outlier_threshold(scores: torch.Tensor) -> float:
    """``median + 3 * 1.4826 * MAD`` of ``scores`` ``(B,)``: the ``auto`` rule of the regimes."""
    med = scores.median()
    return float(med + 3 * 1.4826 * (scores - med).abs().median())


def score_regime(
    dzad,
    rc,
    inputs: list[ScoreInput],
    images: torch.Tensor,
    out: Path,
    reference: Path | None,
    threshold: float | None,
) -> tuple[list[dict[str, Any]], np.ndarray, Threshold, str]:
    """``inputs`` (decoded: ``images`` ``(B,3,S,S)`` at ``rc.image_size``) scored as one batch
    (or against ``reference``): their rows of ``scores.csv``, their maps ``(B, h, w)``, the
    decision rule and the regime's label."""
    from dzad.evaluation import control_backbone

    resample = dzad.cfg.data.resample
    backbone = control_backbone(dzad)
    if reference is None:
        if len(inputs) < 2:
            raise DZADInputError(inputs[0].shown, "--batch-zero-shot needs at least 2 images")
        scored, mode = score_batch(backbone, images, rc, dzad), "batch-zero-shot"
    else:
        refs, _ = collect_inputs([str(reference)], False, out)
        refs, ref_images, _ = decode_batch(refs, rc.image_size, resample, skip_bad=False)
        if not refs:
            raise DZADInputError(reference, "--reference holds no readable image")
        scored, mode = score_few_shot(backbone, images, ref_images, rc, dzad), "few-shot"
    thr = outlier_threshold(scored.scores) if threshold is None else threshold
    scores = scored.scores.double()
    rule = Threshold("image_score", thr, float(scores.min()), float(scores.max()))
    rows = []
    for k, item in enumerate(inputs):
        score = float(scored.scores[k])
        row = {
            "path": item.shown,
            "image_score": score,
            "detection_score": None,  # the per-image eq. 13 score is not computed here
            "decision": "anomalous" if score > thr else "normal",
        }
        rows.append({**row, "normalised_score": rule.normalise(score)})
    return rows, scored.maps[:, 0].float().numpy(), rule, REGIME_LABELS[mode]
