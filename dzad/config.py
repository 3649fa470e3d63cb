"""Frozen configuration dataclasses that mirror ``params.yaml`` section by section.

YAML is parsed once, at the edge (CLI, DVC stages, Prefect flows); the library only ever sees these
objects. Every reading of the paper that ``docs/method.md`` fixes is a field here, never a constant
buried in code. ``from_dict`` rejects unknown keys so a typo in ``params.yaml`` fails loudly, and
checks every value before any work: its type and ``Literal`` choice from the type hints, its range
from :data:`RANGES` (ints and floats >= 0 unless listed; floats finite). One error names the key,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class DatasetRef:
    """A dataset in MVTec layout: ``root/<category>/...``; empty ``categories`` = all of them."""

    root: str = "data/synth/objects"
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 64
    mask_threshold: int = 0  # mask pixel is anomalous when value > mask_threshold (127 -> ">= 128")
    resample: Literal["bilinear", "bicubic"] = "bilinear"
    cache_dir: str = "data/cache"
    skip_bad: bool = False  # log and skip unreadable files instead of stopping


@dataclass(frozen=True)
class SynthConfig:
    dest: str = "data/synth"
    seed: int = 0
    size: int = 96
    n_train: int = 60
    n_test_good: int = 12
    n_test_defect: int = 24
    families: tuple[str, ...] = ("textures", "objects")  # dzad.data.synth.FAMILIES keys


@dataclass(frozen=True)
class SetsConfig:
    """Cross-dataset protocol: train on ``source`` normals, test on each target (method.md §11).

    The ``prepare`` stage makes the roots exist: it generates ``synth.families`` into ``synth.dest``
    (none when empty) and downloads the ``fetch`` datasets into ``data/raw/<name>``; other roots
    (e.g. ``../shared/datasets``) are used where they are, never copied.
    """

    source: tuple[DatasetRef, ...] = (DatasetRef("data/raw/synth/textures"),)
    targets: dict[str, DatasetRef] = field(
        default_factory=lambda: {"objects": DatasetRef("data/raw/synth/objects")}
    )
    fetch: tuple[str, ...] = ()  # dzad.data.fetch.DATASETS names to download (paper study)


@dataclass(frozen=True)
class ModelConfig:
    profile: Literal["tiny", "demo", "real", "paper"] = "demo"  # real: see PROFILE_SETTINGS
    latent: Literal["pixel", "pixel_unshuffle", "vae", "backbone_features"] = "pixel_unshuffle"
    unshuffle_factor: int = 2
    latent_channels: int = 64  # PCA width of the backbone_features latent
    block_out_channels: tuple[int, ...] = ()  # empty = the profile's (dzad.networks.PROFILES)
    use_sg: bool = True  # False = the paper's "SD" ablation row (no SG network at all)
    only_mid_control: bool = True  # DiAD default: control reaches only middle + SFF-fused skips
    sff_norm: Literal["instance", "group"] = "group"  # docs/method.md §3.3: deviation from DiAD
    hint_channels: int = 3  # channels of the image hint (sg_hint: image)
    # SG's hint c of eq. 9: the image x0 (the paper) or its latent z0, i.e. the frozen backbone's
    # features for the backbone_features latent (docs/method.md §3.2)
    sg_hint: Literal["image", "latent"] = "image"
    pretrained: str | None = None  # local diffusers folder or hub id (paper profile)
    freeze_unet_encoder: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085  # SD-1.5's schedule (needed for its pretrained UNet)
    beta_end: float = 0.012
    layers_per_block: int = 0  # 0 = the profile's
    sg_embedding_channels: tuple[int, ...] = ()  # empty = profile's, cut to the hint/latent ratio
    context: Literal["zeros", "empty_prompt"] = "zeros"  # paper profile's fixed text context
    vae: str | None = None  # AutoencoderKL folder / hub id; None = ``pretrained``'s "vae" subfolder
    random_vae: bool = False  # tests only: a randomly initialised VAE; never a silent fallback
    feature_backbone: str = "efficientnet_lite0"  # backbone_features latent (docs/method.md §2)
    random_backbone: bool = False  # tests only
    feature_stride: int = 8  # grid of the backbone_features latent
    feature_local_pool: int = 1  # PatchCore-style k x k local averaging before gridding (1 = off)
    pca_whiten: bool = False  # False: one global scale keeps the PCA spectrum; True: unit variance


DEVICES = ("auto", "cpu", "cuda")  # train.device


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema: bool = True
    ema_decay: float = 0.99
    checkpoint_every: int = 200
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: str = "auto"
    num_workers: int = 0  # DataLoader workers decoding the streamed (not preloaded) images
    preload_max_mb: int = 2048  # hold images + latents in memory when they fit, else stream
    # > 1: `accelerate launch --multi_gpu --num_processes N` (dzad.launch); batch_size % N == 0
    processes: int = 1
    gradient_checkpointing: bool = False  # UNet + SG recompute activations in the backward


@dataclass(frozen=True)
class NoiseConfig:
    """Multi-timestep noise-feature matrix F (eq. 11-12, docs/method.md §5)."""

    n_stages: int = 10
    m_samples: int = 1
    seed: int = 1234
    max_batch: int = 256  # most (image, timestep) pairs per batched forward
    # test-time views (dzad.noise_features.VIEWS): F and the spatial error are averaged over the
    # image and these flips of it (calibration and scoring alike); ("identity",) = the paper
    views: tuple[str, ...] = ("identity",)
    # calibration and scoring forwards (dzad.precision): auto = bf16 on a GPU that has it, else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass(frozen=True)
class WeightingConfig:
    """Weight function of eq. 13 / Table 4 (docs/method.md §6)."""

    name: Literal["dzad", "uniform", "snr", "snr_prime", "exp6", "exp7", "learned"] = "dzad"
    k: float = 3.0
    learned_c: float = 1.0  # inverse L2 strength of the learned weighting's logistic regression


@dataclass(frozen=True)
class DetectionConfig:
    """Detection (eq. 10-12, docs/method.md §7)."""

    mode: str = "self"  # a name of dzad.detection_modes.MODES (checked by from_dict)
    standardise: bool = True  # per-stage z-score with SOURCE-normal statistics
    threshold_quantile: float = 0.95  # tau = this quantile of SOURCE-normal scores
    temperature: float = 1.0  # prototype softmax; used as is when fit_temperature is false
    fit_temperature: bool = True  # fit it on the labelled SOURCE split (prototype mode)
    calibration_holdout: float = 0.1  # share of source normals held out of training to calibrate
    calibration_max_images: int = 256
    gating_bank_size: int = 64  # K source-normal spatial maps kept for eq. 15 gating
    # SOURCE normals (seeded subset, training images included) for the per-stage, per-position
    # error statistics of the noise-excess map (anomaly_map.base); 0 = none (that map then errors)
    position_images: int = 128


@dataclass(frozen=True)
class ReconstructionConfig:
    """DDIM reconstruction (docs/method.md §8)."""

    steps: int = 10
    t_start: int = 999
    spacing: Literal["trailing", "leading"] = "trailing"
    eta: float = 0.0
    clamp: bool = True  # clamp x0-predictions to the SOURCE latent range
    seed: int = 4321


@dataclass(frozen=True)
class MapConfig:
    """Two-branch anomaly map (eq. 14-15) and image score (docs/method.md §9-§10)."""

    backbone: Literal["resnet50", "wide_resnet50_2", "efficientnet_lite0"] = "efficientnet_lite0"
    random_backbone: bool = False  # tests only; never a silent fallback
    gating: Literal["spatial", "scalar", "transductive", "none"] = "spatial"
    w_pn: float = 2.0  # eq. 14: scalar >= 1 applied to images detected normal
    sigma: float = 4.0  # Gaussian smoothing at 256 px, scaled with resolution
    pool_k: int = 8  # k x k average pooling at 256 px, scaled with resolution
    pool_rounds: int = 8
    fusion: Literal["map", "detection", "rank"] = "map"  # which score is the image score
    w_pa_floor: float = 0.1  # eq. 15: lower bound of w_pa(p) (dzad.anomaly_map), in (0, 1]
    latent_distance: Literal["cosine", "l2"] = "cosine"  # map of a latent without a decoder
    # what the gate weighs: "reconstruction" = eq. 14-15's feature distance to the DDIM
    # reconstruction; "noise_excess" = the spatial noise error's excess over SOURCE normals at
    # each position (dzad.detection.excess_map), no reconstruction (docs/method.md §9.4)
    base: Literal["reconstruction", "noise_excess"] = "reconstruction"


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16
    controls: bool = True
    knn_bank_size: int = 4096
    max_images: int = 0  # 0 = all test images
    figures: bool = True
    knn_sampler: Literal["random", "greedy"] = "random"  # subsample of SOURCE-normal patches
    control_levels: tuple[int, ...] = (1, 2)  # backbone levels of feature controls (stride 8, 16)
    control_local_pool: int = 3  # k x k local aggregation of control features (PatchCore: 3)
    mutual_fraction: float = 0.3  # mutual: mean of the smallest 30% of other-image distances
    control_seed: int = 0  # bank subsampling


@dataclass(frozen=True)
class RegimeConfig:
    """Scoring regimes beside per-image zero-shot (docs/method.md §11.1; :mod:`dzad.regimes`).

    ``batch-zero-shot``: the images of one call (one category in evaluate) are scored together,
    unlabelled; ``few-shot``: against ``few_shot_k`` known-good images of the target. Both use the
    backbone at ``image_size`` (chosen on SOURCE data, the study files say why) and, with
    ``dzad_weight > 0``, the noise-error map of a copy of the DZAD model adapted to the batch or
    the references for ``adapt_steps`` steps.
    """

    image_size: int = 256  # input of the backbone path; DZAD sees the images at its own size
    levels: tuple[int, ...] = (1, 2)  # backbone levels (stride 8, 16), pooled onto the first
    degrees: tuple[int, ...] = (1, 3, 5)  # MuSc multi-degree local aggregation (r x r)
    mutual_fraction: float = 0.3  # interval averaging: mean of the nearest 30% of other images
    group_size: int = 100  # evaluate: images scored together (seeded groups); 0 = the category
    rescore_k: int = 0  # image re-scoring among the k most similar images; 0/1 = off
    dzad_weight: float = 0.0  # weight of the DZAD map in the fusion; 0 = backbone only
    adapt_steps: int = 0  # self-training / fine-tuning steps of the DZAD copy; 0 = frozen source
    adapt_rounds: int = 2  # batch mode: drop the highest-error images between rounds
    adapt_drop: float = 0.2  # fraction of the batch dropped after each round but the last
    adapt_lr: float = 1e-4
    adapt_batch_size: int = 16
    dzad_tiles: int = 1  # DZAD copy: n x n tiles per image at its own size (finer map); 1 = whole
    few_shot_k: int = 4  # evaluate --few-shot default
    few_shot_draws: int = 3  # seeded draws of the references (mean +- std over draws)
    mask_k: float = 3.0  # predicted region: map > median + mask_k scaled MADs of the batch's maps
    # few-shot image decision: "references" = above the references' highest leave-one-out score
    # (needs >= 2 references; 1: the batch rule); "batch" = the batch's outlier rule (mask_k-style)
    few_shot_threshold: Literal["references", "batch"] = "references"
    # few-shot predicted region ("references"): map > this quantile of all the pixels of the
    # references' leave-one-out maps (1 = above every one of them; 0.99: docs/results_regimes.md)
    reference_quantile: float = 0.99
    max_images: int = 0  # regimes stage: seeded subset of test images per category; 0 = all
    seed: int = 0  # test subset, groups, reference draws, adaptation noise


@dataclass(frozen=True)
class AblationConfig:
    """Table 4 (``weightings``, rescored from stored F), Figure 4 and Table 3
    (dzad.study.ablations)."""

    weightings: tuple[str, ...] = (
        "uniform",
        "snr",
        "snr_prime",
        "exp6",
        "exp7",
        "dzad_k1",
        "dzad_k5",
        "dzad",
    )
    t_starts: tuple[int, ...] = (250, 500, 750, 999)  # Figure 4 (reconstruction start); () = off
    architecture: bool = False  # Table 3 rows (trains the SD row's own model per seed)
    targets: tuple[str, ...] = ()  # targets of the Figure-4 / Table-3 reruns; () = every target
    max_images: int = 0  # test images per category in those reruns; 0 = evaluate.max_images


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking, registry and promotion (``flows/tracking/``).

    ``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking_uri``; relative SQLite paths and
    ``artifact_root`` are taken from the working directory (the repo root for DVC and the CLI).
    """

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "dzad"
    model_name: str = "dzad"
    tolerance: float = 0.01  # largest drop of a promotion metric that still allows ``champion``
    artifact_root: str = "mlartifacts"  # artifact root of a newly created experiment (local stores)
    promotion_targets: tuple[str, ...] = ()  # targets averaged for promotion; () = all sets.targets
    promotion_metrics: tuple[str, ...] = ("image_auroc", "pixel_auroc")  # each compared on its own
    flush_every: int = 10  # per-step training metrics are buffered and written every N steps
    log_train_state: bool = False  # also log train_state/ (optimizer, raw weights) as an artifact


@dataclass(frozen=True)
class RuntimeConfig:
    """How commands run, not what they compute (``dzad.runtime``): never changes a result beyond
    1e-5 relative, so no DVC stage declares it."""

    threads: int = 0  # torch intra-op threads; 0 = torch's default (cores or OMP_NUM_THREADS)
    # torch.compile the denoiser+SG for scoring; auto = dzad.runtime.COMPILE_DEFAULT per device
    compile: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class DZADConfig:
    study: str = "demo"
    seed: int = 0
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    sets: SetsConfig = SetsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    noise: NoiseConfig = NoiseConfig()
    weighting: WeightingConfig = WeightingConfig()
    detection: DetectionConfig = DetectionConfig()
    reconstruction: ReconstructionConfig = ReconstructionConfig()
    anomaly_map: MapConfig = MapConfig()
    evaluate: EvalConfig = EvalConfig()
    regime: RegimeConfig = RegimeConfig()
    ablation: AblationConfig = AblationConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()


@dataclass(frozen=True)
class Bound:
    """Allowed range of a numeric field (or of each item of a numeric tuple); None = unbounded."""

    lo: float | None = 0
    hi: float | None = None
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False

    def allows(self, v: float) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi}")
        return " and ".join(parts) or "any value"


# Ranges by dotted key ("section.field"). Every int and float field not listed here must be >= 0;
# every float must be finite. Types and Literal choices come from the dataclasses' type hints, so a
# new field is validated without an entry here.
_POS, _UNIT, _OPEN_UNIT = Bound(1), Bound(0, 1), Bound(0, 1, lo_open=True)
RANGES: dict[str, Bound] = {
    "data.image_size": _POS,
    "data.mask_threshold": Bound(0, 255),
    "synth.size": _POS,
    "synth.n_train": _POS,
    "model.unshuffle_factor": _POS,
    "model.latent_channels": _POS,
    "model.block_out_channels": _POS,
    "model.hint_channels": _POS,
    "model.num_train_timesteps": _POS,
    "model.beta_start": _OPEN_UNIT,
    "model.beta_end": _OPEN_UNIT,
    "model.sg_embedding_channels": _POS,
    "model.feature_stride": _POS,
    "model.feature_local_pool": _POS,
    "train.steps": _POS,
    "train.batch_size": _POS,
    "train.lr": Bound(0, lo_open=True),
    "train.processes": _POS,
    "train.ema_decay": _UNIT,
    "noise.n_stages": _POS,
    "noise.m_samples": _POS,
    "noise.max_batch": _POS,
    "weighting.k": Bound(None),
    "weighting.learned_c": Bound(0, lo_open=True),
    "detection.threshold_quantile": _UNIT,
    "detection.temperature": Bound(0, lo_open=True),
    "detection.calibration_holdout": Bound(0, 1, hi_open=True),
    "detection.calibration_max_images": _POS,
    "detection.gating_bank_size": _POS,
    "reconstruction.steps": _POS,
    "anomaly_map.w_pn": Bound(1),
    "anomaly_map.pool_k": _POS,
    "anomaly_map.w_pa_floor": _OPEN_UNIT,
    "evaluate.batch_size": _POS,
    "evaluate.knn_bank_size": _POS,
    "evaluate.control_levels": _POS,
    "evaluate.control_local_pool": _POS,
    "evaluate.mutual_fraction": _OPEN_UNIT,
    "regime.dzad_tiles": _POS,
    "regime.mask_k": Bound(0, lo_open=True),
    "regime.reference_quantile": Bound(0.5, 1),
    "tracking.flush_every": _POS,
}


def _bad(where: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{where}: {value!r} is not allowed; expected {allowed}")


def _leaf(tp: Any, value: Any, where: str, key: str) -> Any:
    """Check one scalar against its type hint (and its :data:`RANGES` bound); return it."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise _bad(where, value, f"one of {list(choices)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(where, value, "true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _bad(where, value, "a string")
        return value
    if tp in (int, float):
        ok = isinstance(value, int) or (tp is float and isinstance(value, float))
        bound = RANGES.get(key, Bound())
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            raise _bad(where, value, f"{'an integer' if tp is int else 'a finite number'} {bound}")
        if not bound.allows(value):
            raise _bad(where, value, f"{'an integer' if tp is int else 'a number'} {bound}")
        return tp(value)
    raise TypeError(f"{where}: no validation rule for type {tp!r}")


def _build(tp: Any, value: Any, where: str, key: str = "") -> Any:
    """Convert plain YAML data ``value`` into type ``tp`` (dataclass, tuple, dict, Optional),
    checking every leaf's type, Literal choice and range; errors name the key and the value.

    ``where`` is the full key shown in errors (``params.train.steps``, ``...[0]``); ``key`` is the
    dotted field name used to look up :data:`RANGES` (``train.steps``).
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
        sub = f"{key}." if key else ""
        return tp(**{k: _build(hints[k], v, f"{where}.{k}", sub + k) for k, v in value.items()})
    if origin is tuple:
        if not isinstance(value, (list, tuple)) and value is not None:
            raise _bad(where, value, "a list")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_build(item, v, f"{where}[{i}]", key) for i, v in enumerate(value or ()))
    if origin is dict:
        if not isinstance(value, dict) and value is not None:
            raise _bad(where, value, "a mapping")
        _, vt = typing.get_args(tp)
        return {str(k): _build(vt, v, f"{where}.{k}", "") for k, v in (value or {}).items()}
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _build(args[0], value, where, key)
    return _leaf(tp, value, where, key)


# `dzad train --profile real`: the configuration chosen for real images on CPU, applied over the
# params' values (the UNet is the demo profile's). Training and map: the `shared` study's settings,
# chosen on SOURCE data (docs/results_shared.md: 128 px, EfficientNet-Lite0 feature latent at
# stride 16 with the latent as SG hint, noise-excess map with 4 noise draws per stage, 400 steps).
PROFILE_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "real": {
        "data": {"image_size": 128, "mask_threshold": 127},
        "model": {"latent": "backbone_features", "sg_hint": "latent", "feature_stride": 16},
        "train": {"steps": 400},
        "noise": {"m_samples": 4},
        "anomaly_map": {"base": "noise_excess"},
    },
}


def with_profile(cfg: DZADConfig, profile: str) -> DZADConfig:
    """``cfg`` with ``model.profile = profile`` and that profile's :data:`PROFILE_SETTINGS`."""
    raw = to_dict(cfg)
    raw["model"]["profile"] = profile
    for section, values in PROFILE_SETTINGS.get(profile, {}).items():
        raw[section].update(values)
    return from_dict(raw)


def validate(cfg: DZADConfig) -> DZADConfig:
    """Check a config built in code (e.g. with command-line overrides) as :func:`load` does."""
    return from_dict(to_dict(cfg))


def load(path: str | Path) -> DZADConfig:
    """Parse a params YAML file (the edge's one YAML read) into a config; errors name the file.

    Read as YAML 1.2, as DVC reads and rewrites it: ``dvc exp run -S`` drops the quotes of
    ``'no'``, which YAML 1.1 (PyYAML) would turn into False but YAML 1.2 keeps a string.
    """
    path = Path(path)
    raw = read_params(path)
    try:
        return from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def parse_yaml(text: str) -> Any:
    """``text`` read as YAML 1.2 (safe), as DVC reads params and ``-S`` values."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def read_params(path: str | Path) -> dict[str, Any]:
    """The plain data of a params YAML file (not yet checked); errors name the file."""
    from ruamel.yaml import YAMLError

    path = Path(path)
    try:
        raw = parse_yaml(path.read_text()) or {}
    except (OSError, YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def from_dict(raw: dict[str, Any]) -> DZADConfig:
    """Build a :class:`DZADConfig` from parsed ``params.yaml`` data (missing keys take defaults)."""
    cfg = _build(DZADConfig, raw, "params")
    # the detection modes are a registry, not a Literal: a new mode is one module plus one entry
    # there. Imported here, not at the top, so that reading a config does not import torch.
    from dzad.detection_modes import MODES

    if cfg.detection.mode not in MODES:
        raise _bad("params.detection.mode", cfg.detection.mode, f"one of {list(MODES)}")
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain, YAML/JSON-serialisable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.profile": "demo", ...}``: the flat form used for tracking parameters."""
    out: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
