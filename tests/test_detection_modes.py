"""Detection modes as registered strategies: a new mode is one module plus a registry entry, and
version-1 checkpoints (every mode's calibration fields side by side) still load and score alike."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dzad.calibration import calibrate_on_source, split_holdout
from dzad.checkpoint import VERSION, load_calibration
from dzad.config import DetectionConfig, from_dict, to_dict
from dzad.data.dataset import ImageDataset, iter_samples
from dzad.data.source import ImageSource
from dzad.decisions import decision_threshold
from dzad.detection_modes import MODES, ModeSource
from dzad.detection_modes.base import FeaturesOf
from dzad.errors import CheckpointError
from dzad.model import DZAD
from dzad.noise_features import NoiseFeatures, encode_views, view_features
from dzad.weighting import stage_means


@dataclass
class GapState:
    centre: Tensor  # (N,) median over SOURCE normals of the hint-minus-null stage means
    tau: float


class NullGapMode:
    """A toy mode written the way a new mode would be: ``s = mean_n |g_n - centre_n|`` where
    ``g`` is the per-stage gap between the SG-hint and the null-hint noise errors."""

    needs_labelled = False

    def extra_features(self, features_of: FeaturesOf, state: Any) -> list[NoiseFeatures]:
        return [features_of(null_hint=True)]

    @staticmethod
    def gap(features: NoiseFeatures, null: NoiseFeatures) -> Tensor:
        return stage_means(features.F) - stage_means(null.F)  # (B,N)

    def fit(self, source: ModeSource, calib, cfg: DetectionConfig) -> GapState:
        gap = self.gap(source.normal, source.normal_of(null_hint=True))
        centre = gap.median(0).values
        own = (gap - centre).abs().mean(1)
        return GapState(centre, float(torch.quantile(own.double(), cfg.threshold_quantile)))

    def score(self, features, extra, calib) -> tuple[Tensor, Tensor]:
        s = (self.gap(features, extra[0]) - calib.state.centre.to(features.F)).abs().mean(1)
        return s, s > calib.state.tau

    def threshold(self, calib) -> tuple[float, bool]:
        return calib.state.tau, False

    def to_tensors(self, state: GapState) -> dict[str, Tensor]:
        return {"centre": state.centre}

    def to_meta(self, state: GapState) -> dict[str, Any]:
        return {"tau": state.tau}

    def from_saved(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> GapState:
        return GapState(tensors["centre"], float(meta["tau"]))


@pytest.fixture(scope="module")
def weave(synth_root, tiny_config) -> tuple[Tensor, Tensor, Tensor]:
    """``weave`` train images ``(n,3,32,32)``, test images and their labels (SOURCE data)."""

    def load(split: str) -> list[dict]:
        samples = list(iter_samples(synth_root, "weave", split))
        ds = ImageDataset(samples, tiny_config.data.image_size, tiny_config.data)
        return [ds[i] for i in range(len(ds))]

    train, test = load("train"), load("test")
    return (
        torch.stack([s["image"] for s in train]),
        torch.stack([s["image"] for s in test]),
        torch.tensor([int(s["label"]) for s in test]),
    )


def recalibrated(model: DZAD, mode: str, weave) -> DZAD:
    """``model`` calibrated for detection ``mode`` on its SOURCE images (as training does)."""
    train, test, labels = weave
    cfg = dataclasses.replace(
        model.cfg, detection=dataclasses.replace(model.cfg.detection, mode=mode)
    )
    normals = ImageSource(train)
    d = cfg.detection
    _, idx = split_holdout(len(normals), d.calibration_holdout, d.calibration_max_images, cfg.seed)
    calib = calibrate_on_source(
        cfg, model.net, model.encoder, model.bank, model.alphas_cumprod, normals, idx,
        model.device, (ImageSource(test), labels), backbone=model.backbone,
    )  # fmt: skip
    return DZAD(cfg, model.encoder, model.net, model.bank, calib, model.backbone)


def test_a_registered_mode_trains_saves_loads_and_scores(tiny_model, weave, tmp_path, monkeypatch):
    raw = to_dict(tiny_model.cfg)
    raw["detection"]["mode"] = "null_gap"
    with pytest.raises(ValueError, match=r"params\.detection\.mode: 'null_gap' is not allowed"):
        from_dict(raw)
    monkeypatch.setitem(MODES, "null_gap", NullGapMode())  # the only change for a new mode
    assert from_dict(raw).detection.mode == "null_gap"

    model = recalibrated(tiny_model, "null_gap", weave)
    assert model.calibration.mode == "null_gap" and model.calibration.state.centre.shape == (4,)
    _, test, labels = weave
    out = model(test)
    model.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "dzad.json").read_text())
    assert meta["calibration"]["mode_state"] == {"tau": model.calibration.state.tau}
    loaded = DZAD.from_checkpoint(tmp_path / "ckpt", random_backbone=True)
    assert torch.equal(loaded.calibration.state.centre, model.calibration.state.centre)
    again = loaded(test)
    assert torch.equal(again.detection_score, out.detection_score)
    assert torch.equal(again.image_score, out.image_score)
    # the score is the toy formula on the images' own hint / null-hint noise features
    viewed = encode_views(loaded.encoder.encode, test, loaded.cfg.noise.views)
    features_of = partial(view_features, loaded.net, viewed, loaded.bank, loaded.alphas_cumprod, 64)
    gap = NullGapMode.gap(features_of(), features_of(null_hint=True))
    expected = (gap - model.calibration.state.centre).abs().mean(1)
    assert torch.allclose(out.detection_score, expected, atol=1e-5)
    det = loaded.features(test)
    assert torch.equal(det.decision, out.detection_score > model.calibration.state.tau)
    assert decision_threshold(loaded).value == model.calibration.state.tau
    assert out.detection_score.shape == labels.shape and (out.detection_score >= 0).all()


def test_the_config_and_the_calibration_must_agree_on_the_mode(tiny_model):
    cfg = dataclasses.replace(
        tiny_model.cfg, detection=dataclasses.replace(tiny_model.cfg.detection, mode="contrast")
    )
    with pytest.raises(ValueError, match="fitted for 'self': recalibrate"):
        tiny_model.with_settings(cfg)


def write_version_1(folder) -> None:
    """Rewrite a version-2 checkpoint ``folder`` as version 1 wrote it (the calibration layout
    of ``Calibration.to_tensors`` / ``to_meta`` before detection modes were strategies): contrast
    statistics as ``contrast_mean`` / ``contrast_std``, prototypes as ``prototype.<k>.*``, and
    ``tau_contrast`` (None unless contrast) and ``temperature`` among the shared scalars."""
    meta = json.loads((folder / "dzad.json").read_text())
    tensors = load_file(str(folder / "extra.safetensors"))
    cal = meta["calibration"]
    mode, state = cal.pop("mode"), cal.pop("mode_state")
    old_names = {"mean": "contrast_mean", "std": "contrast_std"}
    out = {}
    for k, v in tensors.items():
        if not k.startswith("calibration.mode."):
            out[k] = v
            continue
        rest = k[len("calibration.mode.") :]
        new = old_names[rest] if mode == "contrast" else f"prototype.{rest}"
        out[f"calibration.{new}"] = v
    cal["tau_contrast"] = state.get("tau") if mode == "contrast" else None
    cal["temperature"] = state.get("temperature", 1.0)
    meta["version"] = 1
    save_file(out, str(folder / "extra.safetensors"))
    (folder / "dzad.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "mode", ["self", *(pytest.param(m, marks=pytest.mark.slow) for m in ("contrast", "prototype"))]
)  # the fast tier migrates one mode's checkpoint
def test_a_version_1_checkpoint_loads_and_scores_the_same(tiny_model, weave, tmp_path, mode):
    model = recalibrated(tiny_model, mode, weave)
    _, test, _ = weave
    out = model(test)
    model.save(tmp_path / "ckpt")
    write_version_1(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "dzad.json").read_text())
    assert meta["version"] == 1 and "mode" not in meta["calibration"]
    loaded = DZAD.from_checkpoint(tmp_path / "ckpt", random_backbone=True)
    assert loaded.calibration.mode == mode
    again = loaded(test)
    for k in ("detection_score", "decision", "image_score", "anomaly_map"):
        assert torch.equal(getattr(again, k), getattr(out, k)), k
    assert load_calibration(tmp_path / "ckpt").to_meta() == model.calibration.to_meta()
    if mode == "contrast":
        assert math.isfinite(loaded.calibration.state.tau)


def test_an_unknown_version_fails_with_how_to_recreate_it(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    meta = json.loads((folder / "dzad.json").read_text())
    assert meta["version"] == VERSION == 2
    (folder / "dzad.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(
        CheckpointError, match=r"version 99 is not one of \[1, 2\]: re-create it"
    ) as err:
        DZAD.from_checkpoint(folder, random_backbone=True)
    assert "\n" not in str(err.value)
