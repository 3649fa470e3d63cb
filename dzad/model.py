"""``DZAD``: the whole pipeline as one module, its forward written out step by step.

Like a diffusers pipeline, it only holds parts built elsewhere (docs/method.md §1): the encoder E
(``dzad.latents``), the SG-conditioned denoiser (``dzad.networks``), the training schedule's
alpha-bar, the noise bank, the SOURCE-only calibration (``dzad.detection``) and the backbone Phi
(``dzad.backbones``). A checkpoint folder (``dzad.checkpoint``) rebuilds it with
:meth:`DZAD.from_checkpoint`. The calibration also holds this pipeline's scores of the held-out
SOURCE normals (``dzad.calibration``): the rank fusion ranks every image against them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from dzad.anomaly_map import base_map, excess_term, gate_weights, scaled, smooth
from dzad.backbones import Backbone, build_backbone
from dzad.checkpoint import load_checkpoint, save_checkpoint
from dzad.config import DZADConfig, to_dict
from dzad.detection import Calibration, detect, excess_map, mode_features, weighted_map
from dzad.errors import CheckpointError
from dzad.latents import Encoder
from dzad.networks import DZADNetwork, make_scheduler
from dzad.noise_features import NoiseBank, encode_views, view_features
from dzad.precision import scoring_precision
from dzad.reconstruction import image_seeds, reconstruct
from dzad.scoring import image_score, pool_size, rank_fusion
from dzad.weighting import stage_means

log = logging.getLogger(__name__)


@dataclass
class Detection:
    """Steps 1-4 only (the ``features_only`` path): enough to rescore without reconstruction."""

    F: Tensor  # (B, N, M) eq. 12 entries
    spatial: Tensor  # (B, N, h, w) spatial noise error per stage
    detection_score: Tensor  # (B,) eq. 13 weighted score (or the mode's score)
    decision: Tensor  # (B,) bool, True = detected anomalous (score > tau)


@dataclass
class DZADOutput:
    """Everything one forward produces (all on the model's device)."""

    image_score: Tensor  # (B,) the score ``anomaly_map.fusion`` selects (map / detection / rank)
    detection_score: Tensor  # (B,)
    decision: Tensor  # (B,) bool
    anomaly_map: Tensor  # (B, 1, H, W) smoothed, gated map
    F: Tensor  # (B, N, M)
    map_score: Tensor  # (B,) pooled max of the map (docs/method.md §10)
    fused_score: Tensor  # (B,) rank fusion of map and detection scores (SOURCE references)


def map_settings(cfg: DZADConfig) -> dict:
    """The inference-time settings a map score depends on (reconstruction, map but its fusion).

    SOURCE reference scores stored in the calibration are valid only under the same settings.
    """
    anomaly_map = {k: v for k, v in to_dict(cfg.anomaly_map).items() if k != "fusion"}
    return {"reconstruction": to_dict(cfg.reconstruction), "anomaly_map": anomaly_map}


def map_backbone(cfg: DZADConfig, encoder: Encoder) -> Backbone | None:
    """Phi of ``cfg.anomaly_map`` (None for a latent without a decoder); BackboneUnavailable.

    Random (test) weights are seeded with ``cfg.seed``, so calibration and loading agree.
    """
    if not encoder.can_decode:
        return None
    m = cfg.anomaly_map
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_backbone(m.backbone, random_weights=m.random_backbone)


class DZAD(nn.Module):
    """The pipeline: ``forward(images (B,3,H,W) in [0,1]) -> DZADOutput``."""

    def __init__(
        self,
        cfg: DZADConfig,
        encoder: Encoder,
        net: DZADNetwork,
        bank: NoiseBank,
        calibration: Calibration,
        backbone: Backbone | None,
    ) -> None:
        super().__init__()
        self._cfg, self.encoder, self.net, self.bank = cfg, encoder, net, bank
        self.calibration = calibration
        self.backbone = backbone
        if encoder.can_decode and backbone is None:
            raise ValueError("a decodable latent needs the backbone Phi for the anomaly map")
        if calibration.mode != cfg.detection.mode:
            raise ValueError(
                f"detection.mode is {cfg.detection.mode!r} but the calibration was fitted for "
                f"{calibration.mode!r}: recalibrate (dzad.calibration.calibrate_on_source)"
            )
        self.register_buffer("alphas_cumprod", make_scheduler(cfg.model).alphas_cumprod.clone())
        self.clamp_range = encoder.latent_range()  # SOURCE latent range (docs/method.md §8)
        if cfg.reconstruction.clamp and self.clamp_range is None:
            log.warning(
                "reconstruction.clamp is on but the %s latent has no SOURCE range (encoder not "
                "fitted): x0-predictions are not clamped",
                cfg.model.latent,
            )
        self._warned_reference = False
        self.eval()

    @property
    def cfg(self) -> DZADConfig:
        """The settings this model was built and checked with; read-only: other settings make
        another model (:meth:`with_settings`)."""
        return self._cfg

    @property
    def image_size(self) -> int:
        return int(self.net.image_size)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def reference_problem(self) -> str | None:
        """Why the stored SOURCE reference scores cannot rank this model's scores, or None."""
        calib = self.calibration
        if calib.ref_map is None or calib.ref_detection is None:
            return "the checkpoint stores no SOURCE reference scores"
        if calib.ref_settings != map_settings(self.cfg):
            return "the reconstruction / anomaly-map settings differ from the calibration's"
        return None

    def fusion_references(self) -> tuple[Tensor, Tensor] | None:
        """(map, detection) scores ``(R,)`` of the held-out SOURCE normals, or None (see
        :meth:`reference_problem`): rank fusion then ranks within the scored set."""
        if self.reference_problem() is not None:
            return None
        return self.calibration.ref_map, self.calibration.ref_detection  # type: ignore[return-value]

    @classmethod
    def from_checkpoint(
        cls,
        folder: str | Path,
        backbone_override: str | None = None,
        random_backbone: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> DZAD:
        """Rebuild from a checkpoint folder; raises CheckpointError / BackboneUnavailable.

        ``backbone_override`` replaces ``anomaly_map.backbone``; ``random_backbone`` (tests only)
        uses random weights instead of stopping when the ImageNet weights are missing.
        """
        cfg, encoder, net, bank, calibration, _ = load_checkpoint(folder)
        if calibration is None:
            raise CheckpointError(folder, "intermediate training checkpoint (not calibrated yet)")
        map_cfg = cfg.anomaly_map
        if backbone_override is not None or random_backbone:
            map_cfg = dataclasses.replace(
                map_cfg,
                backbone=backbone_override or map_cfg.backbone,
                random_backbone=random_backbone or map_cfg.random_backbone,
            )
            cfg = dataclasses.replace(cfg, anomaly_map=map_cfg)
        backbone = map_backbone(cfg, encoder)
        return cls(cfg, encoder, net, bank, calibration, backbone).to(map_location)

    def with_settings(self, cfg: DZADConfig) -> DZAD:
        """A new model of ``cfg`` on the same parts (weights shared, nothing copied), built by
        :meth:`__init__` so that its checks run; ``self`` stays as it is.

        ``cfg`` may change inference settings only: the parts (encoder, network, bank,
        calibration) were built for this model's ``model`` section and noise bank.
        """
        if cfg.model != self.cfg.model:
            raise ValueError("with_settings: another `model` section needs another checkpoint")
        bank = ("n_stages", "m_samples", "seed")
        if any(getattr(cfg.noise, k) != getattr(self.cfg.noise, k) for k in bank):
            raise ValueError(
                "with_settings: another noise bank (noise.n_stages / m_samples / seed) needs a new "
                "calibration (dzad.study.ablation_reruns.recalibrated)"
            )
        model = DZAD(cfg, self.encoder, self.net, self.bank, self.calibration, self.backbone)
        return model.to(self.device)

    def save(self, folder: str | Path) -> Path:
        """Write a checkpoint folder (atomic swap) that :meth:`from_checkpoint` reads back."""
        return save_checkpoint(
            folder, self.cfg, self.encoder, self.net, self.bank, self.calibration
        )

    @torch.inference_mode()
    def features(self, images: Tensor) -> Detection:
        """Steps 1-4 of :meth:`forward` for ``images`` ``(B,3,H,W)`` in [0,1]."""
        x0 = images.to(self.device, torch.float32)
        return self._detect(x0, self._encode(x0))

    def _encode(self, x0: Tensor) -> Tensor:
        """z0 = E(x0) ``(B,C,h,w)`` fp32, encoded in ``noise.precision`` as calibration encodes."""
        with scoring_precision(self.cfg.noise.precision, self.device):
            return self.encoder.encode(x0).float()

    def _detect(self, x0: Tensor, z0: Tensor) -> Detection:
        cfg = self.cfg
        # 2. noise features (eq. 11-12): F (B,N,M), spatial (B,N,h,w); the hint is x0 or z0 (eq. 9)
        # (averaged over the test-time views of noise.views, each flipped back)
        # (noise.precision: the same arithmetic as the calibration's, dzad.precision)
        with scoring_precision(cfg.noise.precision, self.device):
            viewed = encode_views(self.encoder.encode, x0, cfg.noise.views, z0)
            features_of = partial(
                view_features, self.net, viewed, self.bank, self.alphas_cumprod, cfg.noise.max_batch
            )
            feats, extra = mode_features(features_of, self.calibration)
        # 3. weighted detection score (eq. 12-13): (B,)   4. decision vs tau: (B,) bool
        score, decision = detect(feats, self.calibration, extra)
        return Detection(feats.F, feats.spatial, score, decision)

    def _references(self) -> tuple[Tensor | None, Tensor | None]:
        refs = self.fusion_references()
        if refs is None and self.cfg.anomaly_map.fusion == "rank" and not self._warned_reference:
            log.warning("rank fusion within the batch: %s", self.reference_problem())
            self._warned_reference = True
        return refs or (None, None)

    def gate(self, det: Detection, size: tuple[int, int]) -> Tensor:
        """Eq. 14-15's gate ``(B,1,H,W)`` for the images of ``det`` (steps 1-4) at ``size``."""
        calib = self.calibration
        err = weighted_map(det.spatial, calib)  # (B,h,w), same weighting as normal_spatial
        keys = stage_means(det.F, *calib.stats())  # (B,N), same keys as normal_keys
        return gate_weights(
            det.decision, err, keys, self.cfg.anomaly_map, size,
            calib.normal_keys, calib.normal_spatial,
        )  # fmt: skip

    def _reconstruction_map(self, x0: Tensor, z0: Tensor, gate: Tensor) -> Tensor:
        """Eq. 14-15's base map ``(B,1,H,W)``: x0 ``(B,3,H,W)`` against its DDIM reconstruction
        from ``t_start`` (SG conditioned on x0 at every step), gated by ``gate`` ``(B,1,H,W)``.
        The network forwards run in ``noise.precision``, the distances in fp32."""
        cfg = self.cfg
        size = (x0.shape[-2], x0.shape[-1])
        with scoring_precision(cfg.noise.precision, self.device):
            z0_hat = reconstruct(
                self.net,
                z0,
                self.net.hint(x0, z0),
                cfg.reconstruction,
                cfg.model.num_train_timesteps,
                clamp_range=self.clamp_range,
                alphas_cumprod=self.alphas_cumprod,
                seeds=image_seeds(x0, cfg.reconstruction.seed),
            ).float()  # (B,C,h,w)
            if self.encoder.can_decode:
                x0_hat = self.encoder.decode(z0_hat).float()  # (B,3,H,W): the one decode
                f_x, f_hat = self.backbone(x0), self.backbone(x0_hat)  # per level (B,C_l,h_l,w_l)
        if self.encoder.can_decode:
            return base_map([f.float() for f in f_x], [f.float() for f in f_hat], size, gate)
        # latent without a decoder: distances between z0 and z0_hat themselves
        return base_map([z0], [z0_hat], size, gate, cfg.anomaly_map.latent_distance)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> DZADOutput:
        """Score ``images`` ``(B,3,H,W)`` in [0,1] (square, ``image_size``); steps 1-7."""
        cfg, calib = self.cfg, self.calibration
        x0 = images.to(self.device, torch.float32)  # (B,3,H,W)
        if x0.ndim != 4 or x0.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected (B,3,{self.image_size},{self.image_size}) images")
        size = (x0.shape[-2], x0.shape[-1])

        # 1. encode: z0 = E(x0)                                   (B,C,h,w)
        z0 = self._encode(x0)
        # 2-4. noise features, weighted score, decision          F (B,N,M); s, decision (B,)
        det = self._detect(x0, z0)

        # 5. two-branch gate (eq. 14-15) on the spatial noise error      (B,1,H,W)
        gate = self.gate(det, size)
        # 6. gated base map: distance to the DDIM reconstruction (the paper's eq. 14-15) or the
        # noise error's excess over SOURCE normals at each position (anomaly_map.base)
        if cfg.anomaly_map.base == "noise_excess":
            raw = excess_term(excess_map(det.spatial, calib), size, gate)  # (B,1,H,W)
        else:
            raw = self._reconstruction_map(x0, z0, gate)  # (B,1,H,W)

        # 7. smoothing (sigma at 256 px, scaled) and the pooled-max image score
        m = smooth(raw, scaled(cfg.anomaly_map.sigma, size[0]))  # (B,1,H,W)
        k = pool_size(cfg.anomaly_map.pool_k, size[0])
        map_score = image_score(m, k, cfg.anomaly_map.pool_rounds)  # (B,)
        # rank fusion against SOURCE-normal references (CPU: the references live there)
        fused = rank_fusion(map_score.cpu(), det.detection_score.cpu(), *self._references())
        fused = fused.to(map_score)  # (B,)
        chosen = {"map": map_score, "detection": det.detection_score, "rank": fused}
        return DZADOutput(
            image_score=chosen[cfg.anomaly_map.fusion],
            detection_score=det.detection_score,
            decision=det.decision,
            anomaly_map=m,
            F=det.F,
            map_score=map_score,
            fused_score=fused,
        )
