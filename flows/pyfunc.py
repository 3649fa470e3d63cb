"""MLflow pyfunc wrapper of a DZAD checkpoint, logged as code (models-from-code: no pickle).

``flows.tracking.registry.register`` logs this file with two artifacts, the checkpoint folder and
the study's config (JSON); loading runs the file and builds the model with
:func:`dzad.study.seed_evaluation.load_model`, so the registered model scores exactly as the
evaluation did (same inference-time settings).

Input (signature column ``image``, one image per row): a path to an image file (read like the
datasets) or an array ``(H,W)``, ``(H,W,C)`` or ``(C,H,W)`` with C in {1, 3}: integer arrays on the
8-bit scale (uint16: 16-bit), float arrays in [0, 1]. Files and arrays take one path to the model's
size: PIL's resize with the study's ``data.resample`` (:func:`array_image`), so an image scores the
same given as a path or as the uint8 array of its pixels. A batch array ``(B,H,W,C)`` goes in as
``{"image": batch}``.

Output: a DataFrame, one row per input image: ``image_score``, ``detection_score``, ``decision``
(detected anomalous) and ``anomaly_map`` (an ``(H, W)`` float32 array at the model's size).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType, Array

INPUT_COLUMN = "image"
# MLflow schemas have no union type: the column is typed `any` and this says what it holds
# (logged as model metadata and in the registered version's description).
INPUT_DOC = (
    "column 'image', one image per row: a path to an image file (string) or an image array, "
    "HxWx3 uint8 (also HxW, CxHxW; uint16; float in [0, 1])"
)
CHECKPOINT, CONFIG = "checkpoint", "config"  # artifact keys: checkpoint folder, study config JSON


def signature() -> ModelSignature:
    """``image`` (path or array) -> scores, decision and the anomaly map."""
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), INPUT_COLUMN)]),
        outputs=Schema(
            [
                ColSpec("double", "image_score"),
                ColSpec("double", "detection_score"),
                ColSpec("boolean", "decision"),
                ColSpec(Array(Array("float")), "anomaly_map"),
            ]
        ),
    )


def input_example(size: int) -> pd.DataFrame:
    """One mid-grey ``(size, size, 3)`` uint8 image: portable (no file path), checks the wiring."""
    return pd.DataFrame({INPUT_COLUMN: [np.full((size, size, 3), 128, dtype=np.uint8)]})


def array_image(value: Any, size: int, resample: str = "bilinear") -> torch.Tensor:
    """An image array (see the module docstring) -> ``(3, size, size)`` float32 in [0, 1].

    Resized like a file (:func:`dzad.data.images.pil_to_tensor`, the same PIL resize): uint8
    arrays as 8-bit ``L`` / ``RGB`` images, so an image read into an array scores exactly as its
    file; other dtypes as float planes (``F``) scaled to [0, 1].
    """
    from PIL import Image

    from dzad.data.images import pil_to_tensor

    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"image array must be (H,W), (H,W,C) or (C,H,W) with C 1|3: {arr.shape}")
    if arr.dtype == np.uint8:
        planes = [Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))]
    else:
        planes = [Image.fromarray(np.ascontiguousarray(c)) for c in _unit(arr).transpose(2, 0, 1)]
    x = torch.cat([pil_to_tensor(p, size, resample) for p in planes])
    return x.expand(3, -1, -1).contiguous()


def _unit(arr: np.ndarray) -> np.ndarray:
    """Integer (8-bit scale; uint16: 16-bit) or float [0, 1] values -> float32 in [0, 1]."""
    if arr.dtype.kind in "iu":
        full = 65535.0 if arr.dtype == np.uint16 else 255.0
        if arr.size and (arr.min() < 0 or arr.max() > full):
            raise ValueError(f"integer image values must lie in [0, {full:.0f}]")
        return arr.astype(np.float32) / full
    if arr.dtype.kind == "f":
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ValueError("float image values must be finite and lie in [0, 1]")
        return arr.astype(np.float32)
    raise ValueError(f"unsupported image array dtype {arr.dtype}")


def _items(model_input: Any) -> list[Any]:
    """One entry per image from a DataFrame / dict column ``image``, a list or a batch array."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input:
            raise ValueError(f"input needs a column {INPUT_COLUMN!r}")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict):
        return _items(model_input[INPUT_COLUMN])
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return list(model_input)
    if isinstance(model_input, (list, tuple, pd.Series)):
        return list(model_input)
    raise ValueError(f"unsupported input type {type(model_input).__name__}")


class DZADPyfunc(PythonModel):
    """Scores images with the artifacts' checkpoint; ``load_model(..., model_config={"device":
    "cuda", "batch_size": 64})`` overrides the config's device and evaluation batch size."""

    def load_context(self, context: Any) -> None:
        """The model as :func:`dzad.study.seed_evaluation.load_model` builds it for evaluation (same
        settings)."""
        import json

        from dzad.config import from_dict
        from dzad.study.seed_evaluation import load_model

        conf = context.model_config or {}
        cfg = from_dict(json.loads(Path(context.artifacts[CONFIG]).read_text()))
        self.model = load_model(context.artifacts[CHECKPOINT], cfg, conf.get("device"))
        self.batch_size = int(conf.get("batch_size", cfg.evaluate.batch_size))
        self.size = self.model.image_size
        self.resample = self.model.cfg.data.resample

    def _tensor(self, item: Any) -> torch.Tensor:
        from dzad.data.images import load_image

        if isinstance(item, (str, Path)):  # full decode, then the arrays' resize
            return load_image(item, self.size, self.resample, draft=False)
        return array_image(item, self.size, self.resample)

    def _batches(self, items: list[Any]) -> Iterable[torch.Tensor]:
        for s in range(0, len(items), self.batch_size):
            yield torch.stack([self._tensor(v) for v in items[s : s + self.batch_size]])

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Images -> one row each (columns in the module docstring).

        MLflow hands over a DataFrame (after enforcing the signature; the hint also keeps it from
        deriving a second one); direct calls may pass a list, a dict or a batch array as well.
        """
        rows: dict[str, list[Any]] = {
            "image_score": [],
            "detection_score": [],
            "decision": [],
            "anomaly_map": [],
        }
        for x in self._batches(_items(model_input)):
            out = self.model(x)
            rows["image_score"] += out.image_score.float().cpu().tolist()
            rows["detection_score"] += out.detection_score.float().cpu().tolist()
            rows["decision"] += out.decision.cpu().tolist()
            rows["anomaly_map"] += list(out.anomaly_map[:, 0].float().cpu().numpy())
        return pd.DataFrame(rows)


set_model(DZADPyfunc())
