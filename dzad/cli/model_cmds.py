"""Model commands: ``dzad train`` (eq. 8 + SOURCE calibration) and ``dzad profiles``.

Thin edges over :func:`dzad.training.train` and :func:`dzad.networks.model_stats`; the config comes
from ``--config`` (or its older spelling ``--params``; else the defaults), ``--set KEY=VALUE`` and
the named options on top (:mod:`dzad.overrides`).
"""

from __future__ import annotations

import dataclasses
import typing
from enum import StrEnum
from pathlib import Path

import typer

from dzad.cli._app import CATEGORIES_HELP, app, clean_errors, load_config, split_list
from dzad.cli.model_options import set_option
from dzad.config import DEVICES, DZADConfig, ModelConfig, with_profile
from dzad.io_utils import check_writable
from dzad.overrides import Overrides, apply_assignments, parse_assignments, with_options

# choices shown in --help, taken from the config's own allowed values
_PROFILES = typing.get_args(typing.get_type_hints(ModelConfig)["profile"])
Profile = StrEnum("Profile", {p: p for p in _PROFILES})
Device = StrEnum("Device", {d: d for d in DEVICES})


def train_config(
    cfg: DZADConfig, profile: str | None, assignments: list[str], given: Overrides
) -> DZADConfig:
    """``cfg`` with ``--profile`` (its :data:`dzad.config.PROFILE_SETTINGS` first, so what follows
    wins over them), then ``--set KEY=VALUE`` and the named options, validated."""
    if profile is not None:
        cfg = with_profile(cfg, profile)
    return apply_assignments(cfg, with_options(parse_assignments(assignments), given.assignments()))


def _source_sets(cfg: DZADConfig, data: Path, categories: list[str]):
    """The config with ``--data`` as its SOURCE (``sets.source``: the resolved root and the
    categories used), the SOURCE normals (train split), the record of them, and, if the config
    needs it, the labelled SOURCE test split."""
    from dzad.calibration import needs_labelled
    from dzad.config import DatasetRef
    from dzad.data.dataset import ImageDataset, list_categories
    from dzad.data.source import source_labelled, source_normals
    from dzad.errors import DZADInputError
    from dzad.training_data import data_record

    if not data.is_dir():
        raise DZADInputError(data, "dataset root is not a folder")
    ref = DatasetRef(str(data.resolve()), tuple(categories or list_categories(data)))
    cfg = dataclasses.replace(cfg, sets=dataclasses.replace(cfg.sets, source=(ref,)))
    normals = source_normals([ref], skip_bad=cfg.data.skip_bad)
    train_set = ImageDataset(normals, cfg.data.image_size, cfg.data)
    labelled = (
        source_labelled([ref], cfg.data.image_size, cfg.data) if needs_labelled(cfg) else None
    )
    return cfg, train_set, data_record([ref], normals), labelled


@app.command("train")
@clean_errors
def train_cmd(
    data: Path = typer.Option(..., help="SOURCE dataset root (MVTec layout)."),
    out: Path = typer.Option(..., help="Checkpoint folder to write (atomically)."),
    source_categories: list[str] = typer.Option(None, help=CATEGORIES_HELP),
    profile: Profile | None = typer.Option(
        None,
        help="Model profile (overrides params); `real` also sets the configuration chosen for "
        "real images on CPU (dzad.config.PROFILE_SETTINGS).",
    ),
    params: Path | None = typer.Option(
        None, "--config", "--params", help="Params / study YAML file; defaults when absent."
    ),
    set_: list[str] = set_option(),
    steps: int | None = typer.Option(None, help="Training steps (overrides params)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    device: Device | None = typer.Option(None, help="Training device (overrides params)."),
    threads: int | None = typer.Option(
        None, min=0, help="torch threads (overrides runtime.threads; 0 = torch's default)."
    ),
) -> None:
    """Train DZAD on the SOURCE normals, calibrate on SOURCE data, write a checkpoint.

    The checkpoint records its SOURCE (``sets.source`` = --data and the categories used) and the
    training data (roots, categories, image count, manifest hash): ``dzad evaluate`` reads its
    controls' SOURCE from there; ``--resume`` refuses other data or a folder without a checkpoint.
    """
    from dzad.runtime import set_threads
    from dzad.training import train
    from dzad.training_data import describe

    cfg = train_config(
        load_config(params),
        None if profile is None else profile.value,
        set_,
        Overrides(steps=steps, device=None if device is None else device.value, threads=threads),
    )
    set_threads(cfg.runtime.threads)
    check_writable(out.parent)  # the checkpoint is built beside --out and swapped in
    cats = split_list(source_categories)
    cfg, images, record, labelled = _source_sets(cfg, data, cats)
    typer.echo(f"training on {describe(record)} ({cfg.model.profile} profile)")
    result = train(cfg, images, out, resume=resume, labelled=labelled, data=record)
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    typer.echo(
        f"checkpoint: {result.checkpoint} (step {result.steps}, final loss {final}, "
        f"{result.images_per_second:.1f} images/s, tau {result.calibration.tau:.4g})"
    )


@app.command("profiles")
@clean_errors
def profiles_cmd(
    profile: list[str] = typer.Option(["tiny", "demo"], help="Profiles to report (repeat)."),
    params: Path | None = typer.Option(None, help="params.yaml; defaults when absent."),
) -> None:
    """Parameters and FLOPs per forward of each profile at the configured latent and image size."""
    import torch

    from dzad.latents import build_encoder
    from dzad.networks import build_network, model_stats

    for name in profile:
        cfg = with_profile(load_config(params), name)  # `real` brings its latent and image size
        image_size = cfg.data.image_size
        # the latent is the config's (a VAE's: model.vae / model.pretrained)
        channels, size, _ = build_encoder(cfg.model, image_size).latent_shape(image_size)
        model = dataclasses.replace(cfg.model, pretrained=None)
        torch.manual_seed(0)
        net = build_network(model, channels, size, image_size=image_size)
        s = model_stats(net, channels, size)
        typer.echo(
            f"{name}: latent {channels}x{size}x{size}, params {s['params'] / 1e6:.2f} M "
            f"(unet {s['unet'] / 1e6:.2f}, sg {s['sg'] / 1e6:.2f}, sff {s['sff'] / 1e6:.3f}), "
            f"{s['flops_per_forward'] / 1e9:.3f} GFLOPs per image forward"
        )
