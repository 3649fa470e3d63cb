"""Bad values and faults: each case a named row of a table, each failure one clear line.

Tables: :data:`CONFIG_FAULTS` (config values refused when loaded), :data:`BAD_THRESHOLDS`
(``dzad score --threshold``), :data:`WRITE_FAULTS` (unwritable or full output). The archive cases
are ``tests/test_fetch.py::UNSAFE``; promotion races and dead servers ``tests/test_registry.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from dzad import config
from dzad.cli import app
from dzad.data.images import load_image
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_dir, atomic_write_text

runner = CliRunner()

# id -> (params YAML, the key the one error line must name, a word of what is allowed)
CONFIG_FAULTS = {
    "steps-negative": ("train: {steps: -5}", "train.steps", ">= 1"),
    "steps-zero": ("train: {steps: 0}", "train.steps", ">= 1"),
    "steps-text": ("train: {steps: abc}", "train.steps", "integer"),
    "steps-float": ("train: {steps: 2.5}", "train.steps", "integer"),
    "steps-bool": ("train: {steps: true}", "train.steps", "integer"),
    "processes-zero": ("train: {processes: 0}", "train.processes", ">= 1"),
    "precision-unknown": ("noise: {precision: fp8}", "noise.precision", "bf16"),
    "latent-channels-text": ('model: {latent_channels: "abc"}', "model.latent_channels", "integer"),
    "image-size-negative": ("data: {image_size: -5}", "data.image_size", ">= 1"),
    "gating-typo": ("anomaly_map: {gating: spatail}", "anomaly_map.gating", "spatial"),
    "profile-unknown": ("model: {profile: huge}", "model.profile", "paper"),
    "latent-unknown": ("model: {latent: jpeg}", "model.latent", "pixel_unshuffle"),
    "lr-nan": ("train: {lr: .nan}", "train.lr", "finite"),
    "lr-inf": ("train: {lr: .inf}", "train.lr", "finite"),
    "lr-zero": ("train: {lr: 0}", "train.lr", "> 0"),
    "ema-text": ('train: {ema: "yes"}', "train.ema", "true or false"),
    "ema-int": ("train: {ema: 1}", "train.ema", "true or false"),
    "quantile-above-one": ("detection: {threshold_quantile: 1.5}", "threshold_quantile", "<= 1"),
    "mask-threshold-256": ("data: {mask_threshold: 300}", "data.mask_threshold", "<= 255"),
    "w-pa-floor-zero": ("anomaly_map: {w_pa_floor: 0}", "anomaly_map.w_pa_floor", "> 0"),
    "seed-negative": ("seed: -1", "params.seed", ">= 0"),
    "dzad-tiles-zero": ("regime: {dzad_tiles: 0}", "regime.dzad_tiles", ">= 1"),
    "channels-item-negative": (
        "model: {block_out_channels: [32, -1]}",
        "model.block_out_channels[1]",
        ">= 1",
    ),
    "tuple-given-scalar": ("model: {block_out_channels: 32}", "block_out_channels", "a list"),
    "targets-not-mapping": ("sets: {targets: [a, b]}", "sets.targets", "a mapping"),
    "target-root-int": ("sets: {targets: {x: {root: 5}}}", "sets.targets.x.root", "a string"),
    "device-int": ("train: {device: 0}", "train.device", "a string"),
    "optional-str-int": ("model: {pretrained: 3}", "model.pretrained", "a string"),
    "section-not-mapping": ("train: 5", "params.train", "mapping"),
    "unknown-section": ("trian: {steps: 5}", "trian", "known"),
    "unknown-key": ("train: {stesp: 5}", "stesp", "known"),
}


@pytest.mark.parametrize(("text", "key", "allowed"), CONFIG_FAULTS.values(), ids=CONFIG_FAULTS)
def test_bad_config_value_is_refused_on_load(tmp_path, text, key, allowed):
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError) as info:
        config.load(path)
    message = str(info.value)
    assert str(path) in message and key in message and allowed in message
    assert "\n" not in message


def test_every_field_is_validated_from_its_type_hints():
    """A value of the wrong shape is refused for every field, including fields added later (no
    per-field code): the mechanism is driven by the dataclass type hints."""
    for key in config.flatten(config.DZADConfig()):
        raw: dict = {}
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = {"not": "a value"} if key != "sets.targets" else {"x": 1}
        with pytest.raises(ValueError, match=rf"params\.{key}"):
            config.from_dict(raw)


def test_valid_values_and_command_line_overrides(tmp_path):
    cfg = config.from_dict({"train": {"steps": 3, "lr": 1}, "model": {"pretrained": None}})
    assert cfg.train.steps == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert config.validate(cfg) == cfg
    with pytest.raises(ValueError, match=r"train\.steps: -5"):
        config.validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=-5)))
    # --profile is a choice of the CLI itself (its error names the option, not the config key)
    for args, key in ((["--steps", "-5"], "train.steps"), (["--profile", "huge"], "--profile")):
        result = runner.invoke(
            app, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "c"), *args]
        )
        assert result.exit_code == 2 and key in result.stderr, result.output
        assert not (tmp_path / "c").exists()


BAD_THRESHOLDS = ["nan", "NaN", "inf", "-inf", "1e999", "high"]


@pytest.mark.parametrize("value", BAD_THRESHOLDS)
def test_non_finite_threshold_is_refused(tmp_path, value):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    result = runner.invoke(
        app, ["score", str(image), "-m", str(tmp_path / "model"), "--threshold", value]
    )
    assert result.exit_code == 2
    assert "--threshold" in result.stderr and "finite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------- outputs and files
def _no_model(*_args, **_kwargs):
    raise AssertionError("the model must not be loaded when --out cannot be written")


def _eacces(*_args, **_kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# id -> how --out is made unwritable: "file-parent", or what creating a file in it raises
WRITE_FAULTS = {"parent-is-a-file": "file-parent", "permission": _eacces, "disk-full": _enospc}


@pytest.mark.parametrize("fault", WRITE_FAULTS.values(), ids=WRITE_FAULTS)
def test_unwritable_out_fails_before_the_model_loads(tmp_path, monkeypatch, fault):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    out = tmp_path / "out"
    if fault == "file-parent":
        (tmp_path / "blocker").write_text("x")
        out = tmp_path / "blocker" / "out"
    else:
        out.mkdir()
        monkeypatch.setattr("dzad.io_utils._create_temp_file", fault)
    monkeypatch.setattr("dzad.cli.score_cmds.load_model", _no_model)
    for cmd in (["score", str(image)], ["evaluate", "--data", str(tmp_path)]):
        result = runner.invoke(app, [*cmd, "-m", "ckpt", "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not writable" in lines[0] and str(out) in lines[0]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_full_disk_in_any_command_is_one_line(capsys, code):
    """train / evaluate / stages: an OSError of a full or read-only disk is one line, exit 2."""
    import typer

    from dzad.cli._app import clean_errors

    @clean_errors
    def command() -> None:
        raise OSError(code, os.strerror(code), "/ckpt/.tiny.1.tmp/unet/model.safetensors")

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: /ckpt/.tiny.1.tmp/unet/model.safetensors: {os.strerror(code)}"


def test_full_disk_while_scoring_leaves_the_earlier_run(tmp_path, monkeypatch, tiny_checkpoint):
    images = tmp_path / "imgs"
    images.mkdir()
    for k in range(3):
        Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(images / f"{k}.png")
    out = tmp_path / "out"
    args = ["score", str(images), "-m", str(tiny_checkpoint), "-o", str(out), "--random-backbone"]
    args.append("--pictures")
    assert runner.invoke(app, [*args, "--batch-size", "1"]).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from dzad.run_panels import RunPictures

    real = RunPictures.write

    def fills_up(self, *a, **k):  # the pictures are written (staged), then the disk is full
        real(self, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunPictures, "write", fills_up)
    (images / "0.png").unlink()
    names = sorted(p.name for p in out.iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk full" in lines[0] and str(out) in lines[0]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the earlier run intact, no orphan heat map, no staging folder
    assert sorted(p.name for p in out.iterdir()) == names
    assert {"heatmaps", "scores.csv", "report.html"} <= set(names)


def test_rescoring_into_one_out_describes_one_run(tmp_path, tiny_checkpoint):
    images = tmp_path / "imgs"
    images.mkdir()
    for k in range(2):
        Image.new("RGB", (32, 32), (90 * k, 20, 60)).save(images / f"{k}.png")
    out = tmp_path / "out"
    base = ["-m", str(tiny_checkpoint), "-o", str(out), "--random-backbone", "--pictures"]
    assert runner.invoke(app, ["score", str(images), *base, "--save-maps"]).exit_code == 0
    assert len(list((out / "heatmaps").iterdir())) == 2 and (out / "maps").is_dir()
    result = runner.invoke(app, ["score", str(images / "1.png"), *base])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "scores.csv")
    assert [p.name for p in (out / "heatmaps").iterdir()] == ["1.png.heatmap.png"]
    assert table.heatmap.tolist() == ["heatmaps/1.png.heatmap.png"]
    assert not (out / "maps").exists()  # the earlier run's raw maps do not describe this run


def test_second_score_run_into_a_locked_out_fails_clearly(tmp_path, monkeypatch):
    from dzad.io_utils import lock_folder

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    out = tmp_path / "out"
    monkeypatch.setattr("dzad.cli.score_cmds.load_model", _no_model)
    with lock_folder(out, "dzad score run"):  # another run holds --out
        result = runner.invoke(app, ["score", str(image), "-m", "ckpt", "-o", str(out)])
    assert result.exit_code == 2
    assert "in use by another dzad score run" in result.stderr and str(out) in result.stderr
    with lock_folder(out, "dzad score run"):  # released when the holder ends
        pass
    fresh = tmp_path / "fresh"
    result = runner.invoke(app, ["score", str(image), "-m", "ckpt", "-o", str(fresh)])
    assert result.exit_code != 0 and not fresh.exists()  # a failed run leaves no empty --out


def _evaluate_args(tiny_checkpoint, synth_root, out, max_images: int) -> list[str]:
    return [
        "evaluate", "-m", str(tiny_checkpoint), "--data", str(synth_root), "--categories", "grain",
        "--out", str(out), "--random-backbone", "--no-controls", "--max-images", str(max_images),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "fault", [pytest.param("disk-full", marks=pytest.mark.slow), "crash"]
)  # one evaluate each; the fast tier keeps the crash
def test_failed_evaluate_leaves_the_earlier_results(
    tmp_path, monkeypatch, tiny_checkpoint, synth_root, fault
):
    out = tmp_path / "ev"
    first = runner.invoke(app, _evaluate_args(tiny_checkpoint, synth_root, out, 4))
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    names = sorted(p.name for p in out.iterdir())
    import dzad.evaluation

    real = dzad.evaluation.write_outputs

    def fails_after_writing(out_dir, *a, **k):  # every output written (staged), then the fault
        real(out_dir, *a, **k)
        assert (out_dir / "metrics.json").is_file()
        if fault == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(dzad.evaluation, "write_outputs", fails_after_writing)
    # another subset: had it written into --out, metrics.json and the pictures would differ
    result = runner.invoke(app, _evaluate_args(tiny_checkpoint, synth_root, out, 6))
    if fault == "disk-full":
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "disk full" in lines[0] and str(out) in lines[0]
    else:
        assert isinstance(result.exception, RuntimeError)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # metrics.json byte-identical, no staging folder left
    assert sorted(p.name for p in out.iterdir()) == names
    assert {"metrics.json", "report.html", "panels"} <= set(names)


def test_evaluate_replaces_the_earlier_outputs_whole(tmp_path, tiny_checkpoint, synth_root):
    out = tmp_path / "ev"
    args = _evaluate_args(tiny_checkpoint, synth_root, out, 4)
    assert runner.invoke(app, [*args, "--save-maps"]).exit_code == 0
    assert (out / "maps" / "grain.npy").is_file()
    assert runner.invoke(app, _evaluate_args(tiny_checkpoint, synth_root, out, 2)).exit_code == 0
    assert not (out / "maps").exists()  # the earlier run's maps do not describe this run
    assert len(pd.read_csv(out / "scores.csv")) == 2
    assert len(list((out / "panels").rglob("*.png"))) == 2


def test_second_evaluate_into_a_locked_out_fails_clearly(tmp_path, monkeypatch):
    from dzad.io_utils import lock_folder

    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    monkeypatch.setattr("dzad.cli.evaluate_cmds.load_model", _no_model)
    args = ["evaluate", "-m", "ckpt", "--data", str(tmp_path), "--out", str(out)]
    with lock_folder(out, "dzad evaluate run"):  # another evaluate holds --out
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another dzad evaluate run" in lines[0]
    assert str(out) in lines[0] and (out / "metrics.json").read_text() == "{}"


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def test_killed_save_leftovers_are_cleaned_on_the_next_save(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt).mkdir()
    (ckpt / "dzad.json").write_text("old")
    stale = tmp_path / f".ckpt.{_dead_pid()}.0badc0de.tmp"
    (stale / "unet").mkdir(parents=True)
    live = tmp_path / f".ckpt.{os.getpid()}.0badbeef.tmp"  # a writer still running: kept
    live.mkdir()
    (tmp_path / ".ckpt.old").mkdir()
    with atomic_dir(ckpt) as tmp:
        (tmp / "dzad.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", live.name])
    assert (ckpt / "dzad.json").read_text() == "new"


def test_save_killed_between_renames_is_put_back(tmp_path):
    from dzad.io_utils import clean_stale

    (tmp_path / ".ckpt.old").mkdir()
    (tmp_path / ".ckpt.old" / "dzad.json").write_text("step 200")
    clean_stale(tmp_path / "ckpt")  # what resume does first
    assert (tmp_path / "ckpt" / "dzad.json").read_text() == "step 200"
    assert not (tmp_path / ".ckpt.old").exists()


def test_check_writable_leaves_nothing_behind(tmp_path):
    from dzad.io_utils import check_writable

    assert check_writable(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    assert list(tmp_path.iterdir()) == []  # probed in the nearest existing parent


# ------------------------------------------------------------------------------------ images
def _exif_image(path: Path, orientation: int) -> Image.Image:
    """A 40 (wide) x 20 (high) image, left half red, tagged with ``orientation``; as displayed."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return ImageOps.exif_transpose(Image.open(path))


@pytest.mark.parametrize("name", ["r3.jpg", "r6.jpg", "r8.jpg", "r6.png"])
def test_exif_orientation_is_applied(tmp_path, name):
    path = tmp_path / name
    shown = _exif_image(path, int(name[1]))
    t = load_image(path)
    assert t.shape[1:] == (shown.height, shown.width)
    arr = np.asarray(shown, dtype=np.float32) / 255
    assert np.abs(t.permute(1, 2, 0).numpy() - arr).max() < 1e-6
    assert load_image(path, size=(16, 8)).shape == (3, 16, 8)
    assert load_image(path, max_side=10).shape[1:] == ((10, 5) if shown.height > 20 else (5, 10))


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_file_warns_that_frame_one_is_used(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / f"m.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="2 frames; only frame 1"):
        t = load_image(path)
    assert t[0].mean() > 0.9 and t[1].mean() < 0.1  # frame 1 (red)
    single = tmp_path / "s.gif"
    frames[0].save(single, format="GIF")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(single)


def test_image_errors_still_name_the_file(tmp_path):
    bad = tmp_path / "x.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    bad.write_bytes(buf.getvalue()[:40])
    with pytest.raises(DZADInputError, match=r"x\.jpg"):
        load_image(bad)


def test_resume_after_a_save_killed_mid_swap(tmp_path, synth_root, tiny_config, tiny_checkpoint):
    """Killed between its two renames, a save leaves only ``.ckpt.old`` (and a temp folder):
    resume puts the checkpoint back and continues from it instead of starting from scratch."""
    import shutil

    import torch

    from dzad.data.dataset import ImageDataset, iter_samples
    from dzad.training import train

    shutil.copytree(tiny_checkpoint, tmp_path / ".ckpt.old")
    stale = tmp_path / f".ckpt.{_dead_pid()}.0badc0de.tmp"
    stale.mkdir()
    ds = ImageDataset(list(iter_samples(synth_root, "weave", "train")), 32, tiny_config.data)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    result = train(tiny_config, images, tmp_path / "ckpt", resume=True, progress=False)
    assert result.resumed_from == tiny_config.train.steps and result.losses == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
