"""Convert VisA and BTAD releases to the project's one on-disk format, the MVTec AD layout.

Images are copied byte for byte (their format is kept); masks are binarised and written as 8-bit
``<stem>_mask.png`` (0 / 255). The output folder is built under a temporary name and swapped in
whole, then read back with :mod:`dzad.data.dataset` (so it is valid by construction), counted
against the official release's counts, and summarised by a SHA-256 over the sorted ``(relative path,
label)`` list so that two machines can compare their splits.

Expected counts are those of the official releases: VisA from its README (normal / anomaly per
object) and the ``1cls`` split (90 % of the normals train); BTAD as reported for its paper (VT-ADL,
Mishra et al. 2021). Neither table could be checked against the archives here (no network): a
mismatch names the category and both counts. ``expected=None`` skips the check (small fixtures,
partial copies; CLI ``--no-check-counts``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dzad.data.dataset import collect_samples, list_categories
from dzad.data.images import IMAGE_SUFFIXES, binarise, image_size, mask_values
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_dir, atomic_write_text

MARKER = "convert.json"


@dataclass(frozen=True)
class SplitCounts:
    train_good: int
    test_good: int
    test_defect: int


VISA_COUNTS: dict[str, SplitCounts] = {
    "candle": SplitCounts(900, 100, 100),
    "capsules": SplitCounts(542, 60, 100),
    "cashew": SplitCounts(450, 50, 100),
    "chewinggum": SplitCounts(453, 50, 100),
    "fryum": SplitCounts(450, 50, 100),
    "macaroni1": SplitCounts(900, 100, 100),
    "macaroni2": SplitCounts(900, 100, 100),
    "pcb1": SplitCounts(904, 100, 100),
    "pcb2": SplitCounts(901, 100, 100),
    "pcb3": SplitCounts(905, 101, 100),
    "pcb4": SplitCounts(904, 101, 100),
    "pipe_fryum": SplitCounts(450, 50, 100),
}
BTAD_COUNTS: dict[str, SplitCounts] = {
    "01": SplitCounts(400, 21, 49),
    "02": SplitCounts(399, 30, 200),
    "03": SplitCounts(1000, 41, 400),
}


@dataclass(frozen=True)
class ConvertResult:
    dest: Path
    counts: dict[str, SplitCounts]
    split_sha256: str


def split_digest(root: str | Path) -> tuple[dict[str, SplitCounts], str]:
    """Per-category counts and SHA-256 of the sorted ``"<relative path>\\t<label>\\n"`` lines."""
    root = Path(root)
    counts: dict[str, SplitCounts] = {}
    lines = []
    for cat in list_categories(root):
        samples = collect_samples(root, [cat])
        counts[cat] = SplitCounts(
            sum(s.split == "train" for s in samples),
            sum(s.split == "test" and s.label == 0 for s in samples),
            sum(s.split == "test" and s.label == 1 for s in samples),
        )
        lines += [f"{s.path.relative_to(root).as_posix()}\t{s.label}\n" for s in samples]
    return counts, hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def _check_counts(
    src: Path, found: Mapping[str, SplitCounts], expected: Mapping[str, SplitCounts]
) -> None:
    problems = [
        f"{cat}: expected {asdict(exp)}, found {asdict(found[cat]) if cat in found else 'nothing'}"
        for cat, exp in expected.items()
        if found.get(cat) != exp
    ]
    problems += [f"{cat}: not in the official release" for cat in found if cat not in expected]
    if problems:
        raise DZADInputError(
            src,
            "counts differ from the official release ("
            + "; ".join(problems)
            + "); pass --no-check-counts to convert a partial or modified copy",
        )


def _prepare_dest(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise DZADInputError(dest, "exists and is not a folder")
    if dest.exists() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise DZADInputError(dest, "exists, is not empty and is not an earlier conversion")


def _write_mask(src: Path, image: Path, out: Path, threshold: int) -> None:
    """Binarise ``src`` (``value > threshold``) into a 0/255 PNG ``out``; sizes must match."""
    if image_size(src) != image_size(image):
        raise DZADInputError(
            src, f"mask size {image_size(src)} differs from image {image} size {image_size(image)}"
        )
    if out.exists():
        raise DZADInputError(src, f"two defect images share the stem of {out.name}")
    binary = binarise(mask_values(src), threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(binary.astype(np.uint8) * 255).save(out, format="PNG")


def _copy_image(src: Path, out: Path) -> None:
    if not src.is_file():
        raise DZADInputError(src, "listed image is missing")
    if out.exists():
        raise DZADInputError(src, f"two source images map to the same output name {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)


def _finish(
    src: Path, dest: Path, fmt: str, tmp: Path, expected: Mapping[str, SplitCounts] | None
) -> ConvertResult:
    counts, digest = split_digest(tmp)
    if expected is not None:
        _check_counts(src, counts, expected)
    info = {
        "format": fmt,
        "source": str(src),
        "counts": {k: asdict(v) for k, v in counts.items()},
        "split_sha256": digest,
    }
    atomic_write_text(tmp / MARKER, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return ConvertResult(dest, counts, digest)


def _find_root(src: Path, is_root) -> Path:
    """``src`` or its only sub-folder, whichever ``is_root`` accepts (archives add one level)."""
    if is_root(src):
        return src
    subs = [p for p in src.iterdir() if p.is_dir()] if src.is_dir() else []
    if len(subs) == 1 and is_root(subs[0]):
        return subs[0]
    raise DZADInputError(src, "does not look like the expected dataset release")


def convert_visa(
    src: str | Path, dest: str | Path, expected: Mapping[str, SplitCounts] | None = VISA_COUNTS
) -> ConvertResult:
    """VisA (``split_csv/1cls.csv``: object, split, label, image, mask) -> MVTec layout.

    ``normal`` -> ``good``; ``anomaly`` -> defect folder ``bad``. VisA masks hold small integers
    (region ids); any non-zero value is anomalous.
    """
    src = _find_root(Path(src), lambda p: (p / "split_csv" / "1cls.csv").is_file())
    dest = Path(dest)
    _prepare_dest(dest)
    table = src / "split_csv" / "1cls.csv"
    with open(table, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    need = {"object", "split", "label", "image", "mask"}
    if not rows or not need <= set(rows[0]):
        raise DZADInputError(table, f"expected a header with columns {sorted(need)}")
    with atomic_dir(dest) as tmp:
        for i, row in enumerate(rows, start=2):
            split, label = row["split"].strip(), row["label"].strip()
            if split not in ("train", "test") or label not in ("normal", "anomaly"):
                raise DZADInputError(table, f"line {i}: bad split/label {split!r}/{label!r}")
            if split == "train" and label == "anomaly":
                raise DZADInputError(table, f"line {i}: an anomaly in the training split")
            image = src / row["image"]
            defect = "good" if label == "normal" else "bad"
            out = tmp / row["object"] / split / defect / image.name
            _copy_image(image, out)
            if label == "anomaly":
                mask_out = tmp / row["object"] / "ground_truth" / "bad" / f"{image.stem}_mask.png"
                _write_mask(src / row["mask"], image, mask_out, threshold=0)
        return _finish(src, dest, "visa", tmp, expected)


def _btad_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def convert_btad(
    src: str | Path, dest: str | Path, expected: Mapping[str, SplitCounts] | None = BTAD_COUNTS
) -> ConvertResult:
    """BTAD (``NN/{train,test}/ok``, ``NN/test/ko``, ``NN/ground_truth/ko``) -> MVTec layout.

    ``ok`` -> ``good``; ``ko`` stays the defect folder name. Extensions are mixed (``.bmp``,
    ``.png``, ``.jpg``) and a mask may have another extension than its image: it is matched by
    stem. Lossless masks are binarised at ``> 0``; JPEG masks at ``> 127`` (compression noise).
    """

    def is_root(p: Path) -> bool:
        return p.is_dir() and any(
            (c / "train").is_dir() or (c / "test").is_dir() for c in p.iterdir()
        )

    src = _find_root(Path(src), is_root)
    dest = Path(dest)
    _prepare_dest(dest)
    with atomic_dir(dest) as tmp:
        for cat_dir in sorted(p for p in src.iterdir() if p.is_dir()):
            if not ((cat_dir / "train").is_dir() or (cat_dir / "test").is_dir()):
                continue
            cat = cat_dir.name
            for split, sub, defect in (
                ("train", "ok", "good"),
                ("test", "ok", "good"),
                ("test", "ko", "ko"),
            ):
                for image in _btad_images(cat_dir / split / sub):
                    _copy_image(image, tmp / cat / split / defect / image.name)
                    if defect == "good":
                        continue
                    masks = [
                        m
                        for m in _btad_images(cat_dir / "ground_truth" / sub)
                        if m.stem == image.stem
                    ]
                    if len(masks) != 1:
                        why = "no mask" if not masks else f"{len(masks)} masks"
                        raise DZADInputError(image, f"defect image has {why} in ground_truth/ko")
                    threshold = 127 if masks[0].suffix.lower() in (".jpg", ".jpeg") else 0
                    out = tmp / cat / "ground_truth" / defect / f"{image.stem}_mask.png"
                    _write_mask(masks[0], image, out, threshold)
        return _finish(src, dest, "btad", tmp, expected)
