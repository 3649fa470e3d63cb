"""Mean ± std over seeds of a target's evaluations, and the standard JSON (no NaN) DVC reads."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dzad.io_utils import atomic_write_text

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
    # why a metric is undefined (NaN -> null), per category: e.g. no good images, no image AUROC
    undefined = runs[0].get("skipped", {}).get("metrics", {})
    if undefined:
        out["undefined"] = undefined
    cats = runs[0]["categories"]
    out["categories"] = {
        c: {
            m: mean_std([r["categories"].get(c, {}).get(m) for r in runs])["mean"]
            for m in KEY_METRICS
        }
        for c in cats
    }
    return out


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
