"""Checkpoint folder (docs/architecture.md "Checkpoint folder"): safetensors + JSON, never pickle.

``unet/``, ``sg/`` (absent without SG) and ``vae/`` (vae latent only) are diffusers'
``save_pretrained`` folders; ``extra.safetensors`` holds the SFF weights, the fixed text context,
the encoder's fitted statistics, the noise bank and the calibration tensors; ``dzad.json`` the
config, the calibration scalars and the training metadata. ``train_state/`` (optimizer and EMA
state, written during training; the step draws are seeded by step) makes ``resume`` exact. The
folder is swapped in atomically, so a crash keeps the previous checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from dzad import __version__
from dzad.config import DZADConfig, from_dict, to_dict
from dzad.detection import Calibration
from dzad.errors import CheckpointError, DZADInputError
from dzad.io_utils import atomic_dir, atomic_write_text
from dzad.latents import Encoder, VAEEncoder, build_encoder
from dzad.local_models import load_local, require_parts
from dzad.networks import DZADNetwork, assemble_network
from dzad.noise_features import NoiseBank

# version 2: the calibration keeps the detection mode's state under ``mode.`` / ``mode_state``
# (dzad.detection_modes); version 1 checkpoints load through :func:`_calibration_from_v1`
FORMAT, VERSION = "dzad-checkpoint", 2
READABLE = (1, VERSION)
TRAIN_STATE = "train_state"


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}


def _section(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(
    folder: str | Path,
    cfg: DZADConfig,
    encoder: Encoder,
    net: DZADNetwork,
    bank: NoiseBank,
    calibration: Calibration | None,
    extra_meta: dict[str, Any] | None = None,
    *,
    train_state: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write the whole checkpoint under a temp name and swap it in; returns ``folder``.

    ``calibration`` None = an intermediate training checkpoint (not yet usable for detection).
    ``train_state`` = (tensors, JSON scalars) for exact resume.
    """
    folder = Path(folder)
    tensors = _prefixed("net", {"context": net.context})
    if net.sff is not None:
        tensors.update(_prefixed("sff", net.sff.state_dict()))
    tensors.update(_prefixed("encoder", encoder.extra_state()))
    tensors.update(_prefixed("bank", bank.to_tensors()))
    if calibration is not None:
        tensors.update(_prefixed("calibration", calibration.to_tensors()))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dzad_version": __version__,
        "config": to_dict(cfg),
        "model": {
            "latent_channels": encoder.latent_channels,
            "latent_size": int(bank.noise.shape[-1]),
            "image_size": net.image_size,
        },
        "calibration": calibration.to_meta() if calibration is not None else None,
        **(extra_meta or {}),
    }
    with atomic_dir(folder) as tmp:
        net.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if net.sg is not None:
            net.sg.save_pretrained(tmp / "sg", safe_serialization=True)
        if isinstance(encoder, VAEEncoder):
            encoder.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        save_file(tensors, str(tmp / "extra.safetensors"))
        if train_state is not None:
            state_tensors, state_meta = train_state
            (tmp / TRAIN_STATE).mkdir()
            save_file(_prefixed("s", state_tensors), str(tmp / TRAIN_STATE / "state.safetensors"))
            atomic_write_text(tmp / TRAIN_STATE / "state.json", json.dumps(state_meta, indent=1))
        atomic_write_text(tmp / "dzad.json", json.dumps(meta, indent=1, allow_nan=False))
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``dzad.json`` of a checkpoint, validated (format and version); CheckpointError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "checkpoint folder does not exist")
    path = folder / "dzad.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(folder, "not a DZAD checkpoint (no dzad.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"unreadable checkpoint metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(path, f"not a DZAD checkpoint (format is not {FORMAT!r})")
    if meta.get("version") not in READABLE:
        raise CheckpointError(
            path,
            f"checkpoint version {meta.get('version')} is not one of {list(READABLE)}: "
            "re-create it with this dzad (`dzad train`, or `dvc repro` for a study)",
        )
    return meta


def _calibration_from_v1(
    tensors: dict[str, Tensor], scalars: dict[str, Any], mode: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A version-1 calibration (every mode's fields side by side) in the version-2 layout.

    Version 1 stored the contrast statistics as ``contrast_mean`` / ``contrast_std`` /
    ``tau_contrast``, the prototypes as ``prototype.<k>.*`` and the softmax ``temperature``
    among the shared scalars, whatever the mode; ``mode`` is the checkpoint's ``detection.mode``.
    """
    scalars = dict(scalars)
    tau_contrast, temperature = scalars.pop("tau_contrast", None), scalars.pop("temperature", 1.0)
    out = {k: v for k, v in tensors.items() if not k.startswith(("prototype.", "contrast_"))}
    state: dict[str, Any] = {}
    if mode == "contrast":
        out.update({"mode.mean": tensors["contrast_mean"], "mode.std": tensors["contrast_std"]})
        state = {"tau": tau_contrast}
    elif mode == "prototype":
        n = len("prototype.")
        out.update({"mode." + k[n:]: v for k, v in tensors.items() if k.startswith("prototype.")})
        state = {"temperature": temperature}
    return out, {**scalars, "mode": mode, "mode_state": state}


def _calibration(meta: dict[str, Any], tensors: dict[str, Tensor]) -> Calibration:
    """The calibration stored in a checkpoint of any readable version."""
    section, scalars = _section(tensors, "calibration"), meta["calibration"]
    if meta["version"] == 1:
        section, scalars = _calibration_from_v1(
            section, scalars, meta["config"]["detection"].get("mode", "self")
        )
    return Calibration.from_tensors(section, scalars)


def _parts(cfg: DZADConfig) -> list[str]:
    """The files and folders a checkpoint of ``cfg`` must hold (checked before loading any)."""
    parts = ["extra.safetensors", "unet/"]
    parts += ["sg/"] if cfg.model.use_sg else []
    return parts + (["vae/"] if cfg.model.latent == "vae" else [])


def _load_net(
    folder: Path, cfg: DZADConfig, meta: dict[str, Any], tensors: dict[str, Tensor]
) -> DZADNetwork:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = load_local(UNet2DConditionModel, folder / "unet")
    sg = load_local(ControlNetModel, folder / "sg") if cfg.model.use_sg else None
    net = assemble_network(
        cfg.model,
        unet,
        sg,
        image_size=int(meta["model"]["image_size"]),
        context=tensors["net.context"],
    )
    if net.sff is not None:
        net.sff.load_state_dict(_section(tensors, "sff"))
    return net.eval()


def load_checkpoint(
    folder: str | Path,
) -> tuple[DZADConfig, Encoder, DZADNetwork, NoiseBank, Calibration | None, dict[str, Any]]:
    """Inverse of :func:`save_checkpoint`; any missing/corrupt part raises :class:`CheckpointError`.

    Returns ``(cfg, encoder, net, bank, calibration, meta)``; calibration is None for an
    intermediate training checkpoint. Reads local files only (never a model hub) and no
    process-global state, so threads may load at once (:mod:`dzad.local_models`).
    """
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        cfg = from_dict(meta["config"])
        require_parts(folder, _parts(cfg))
        tensors = load_file(str(folder / "extra.safetensors"))
        model_cfg = cfg.model
        if model_cfg.latent == "vae":
            model_cfg = dataclasses.replace(model_cfg, vae=str(folder / "vae"), pretrained=None)
        encoder = build_encoder(model_cfg, meta["model"]["image_size"])
        encoder.load_extra_state(_section(tensors, "encoder"))
        net = _load_net(folder, cfg, meta, tensors)
        bank = NoiseBank.from_tensors(_section(tensors, "bank"))
        calibration = None
        if meta.get("calibration") is not None:
            calibration = _calibration(meta, tensors)
    except CheckpointError:
        raise
    except (
        OSError,
        KeyError,
        ValueError,
        TypeError,
        RuntimeError,
        SafetensorError,
        DZADInputError,
    ) as exc:
        raise CheckpointError(folder, f"incomplete or corrupt checkpoint: {exc}") from exc
    return cfg, encoder, net, bank, calibration, meta


def load_calibration(folder: str | Path) -> Calibration:
    """The calibration of a finished checkpoint alone (no network is built); CheckpointError."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("calibration") is None:
        raise CheckpointError(folder, "intermediate training checkpoint (not calibrated yet)")
    try:
        return _calibration(meta, load_file(str(folder / "extra.safetensors")))
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise CheckpointError(folder, f"incomplete or corrupt checkpoint: {exc}") from exc


def read_train_state(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """``(tensors, scalars)`` of ``train_state/``, or None when the checkpoint has none."""
    state = Path(folder) / TRAIN_STATE
    if not state.is_dir():
        return None
    try:
        tensors = _section(load_file(str(state / "state.safetensors")), "s")
        return tensors, json.loads((state / "state.json").read_text())
    except (OSError, SafetensorError, json.JSONDecodeError) as exc:
        raise CheckpointError(state, f"corrupt training state: {exc}") from exc
