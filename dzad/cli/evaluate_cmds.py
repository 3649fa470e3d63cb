"""``dzad evaluate``: the paper's protocol on an MVTec-layout root or plain normal / abnormal /
masks folders (metrics, figures, pictures, report.html), per image (zero-shot) or, on a root, in
the batch / few-shot regimes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from dzad.cli._app import CATEGORIES_HELP, MODEL_HELP, app, clean_errors, split_list
from dzad.cli.model_options import (
    COMPILE_HELP,
    THREADS_HELP,
    apply_options,
    check_regime_sources,
    config_option,
    load_model,
    progress,
    regime_config,
    resolve_model,
    scoring_settings,
    set_option,
)
from dzad.cli.score_outputs import print_metrics
from dzad.data.test_sets import FolderSet, MVTecRoot, TestSet
from dzad.errors import DZADInputError
from dzad.io_utils import check_writable, lock_folder, replace_outputs, write_error
from dzad.overrides import EVALUATE_KEYS


def _source_refs(dzad, source: Path | None, source_categories: list[str] | None):
    from dzad.config import DatasetRef

    if source is not None:
        return [DatasetRef(str(source), tuple(split_list(source_categories)))]
    return list(dzad.cfg.sets.source)


@app.command("evaluate")
@clean_errors
def evaluate_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Path = typer.Option(None, "--data", help="Dataset root in MVTec layout."),
    normal: Path = typer.Option(
        None,
        "--normal",
        help="Instead of --data: a folder of normal test images (with --abnormal).",
    ),
    abnormal: Path = typer.Option(
        None, "--abnormal", help="Instead of --data: a folder of abnormal test images."
    ),
    masks: Path = typer.Option(
        None,
        "--masks",
        help="With --abnormal: their masks, matched by file stem (x.png or x_mask.png); "
        "without it: image metrics only.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    categories: list[str] = typer.Option(None, help=CATEGORIES_HELP),
    controls: bool = typer.Option(
        None,
        "--controls/--no-controls",
        help="Score the controls (default: the checkpoint's evaluate.controls).",
    ),
    source: Path = typer.Option(
        None, help="SOURCE dataset root for the controls (default: the checkpoint's sets.source)."
    ),
    source_categories: list[str] = typer.Option(None, help=f"Of --source. {CATEGORIES_HELP}"),
    random_backbone: bool = typer.Option(False, help="Random backbone weights (tests only)."),
    batch_size: int = typer.Option(None, min=1, help="Images per forward."),
    max_images: int = typer.Option(None, min=0, help="Seeded subset per category (0 = all)."),
    save_maps: bool = typer.Option(False, help="Write maps/<category>.npy (zero-shot only)."),
    save_masks: bool = typer.Option(
        False,
        help="Also write the predicted defect regions (binary PNG) under masks/ (a regime: "
        "thresholded per scored batch without labels, regime.mask_k).",
    ),
    skip_bad: bool = typer.Option(False, help="Warn about and skip unreadable files."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json only."),
    threads: int = typer.Option(None, min=0, help=THREADS_HELP),
    compile_: str = typer.Option(None, "--compile", help=COMPILE_HELP),
    batch_zero_shot: bool = typer.Option(
        False, "--batch-zero-shot", help="Regime: each category's test images scored together."
    ),
    few_shot: int = typer.Option(
        0, "--few-shot", min=0, help="Regime: K train/good references per category (0 = off)."
    ),
    regime_params: Path = typer.Option(
        None, "--regime-params", help="Take the `regime` section of this params file."
    ),
    config: Path = config_option(),
    set_: list[str] = set_option(),
) -> None:
    """The paper's protocol on every category under --data (or on the --normal / --abnormal
    folders, one category): metrics, scores, figures, a heat-map panel per image and report.html.

    The checkpoint's config applies; --config / --set may change its scoring-time settings only
    (those of dzad score, the evaluate section and data.mask_threshold).

    ``--out`` is locked for the run (a second evaluate into it fails at once) and receives this
    run's outputs only, swapped in whole at the end; a failed or killed run leaves it as it was.
    """
    if batch_zero_shot and few_shot:
        raise typer.BadParameter("choose one regime: --batch-zero-shot or --few-shot K")
    regime = batch_zero_shot or few_shot
    if regime and save_maps:
        raise typer.BadParameter("--save-maps is per image (zero-shot) only; not with a regime")
    test_set = _test_set(data, normal, abnormal, masks, categories, regime, skip_bad)
    check_regime_sources(regime_params, config, set_)
    check_writable(out)  # before the model is loaded and anything evaluated
    with lock_folder(out, "dzad evaluate run"), _staged(out) as stage:
        options = {
            "runtime.threads": threads,
            "runtime.compile": compile_,
            "evaluate.batch_size": batch_size,
            "evaluate.max_images": max_images,
            "evaluate.controls": controls,
        }
        changes = scoring_settings(model, config, set_, options, EVALUATE_KEYS, json_out)
        dzad = load_model(model, random_backbone, changes)
        apply_options(dzad)
        if not json_out:
            from dzad.checkpoint import read_meta
            from dzad.training_data import describe

            typer.echo(f"model trained on {describe(read_meta(resolve_model(model)).get('data'))}")
        eval_cfg = dzad.cfg.evaluate
        if batch_zero_shot or few_shot:
            result = _evaluate_regime(
                dzad, test_set, stage, split_list(categories), regime_params, eval_cfg, few_shot,
                batch_size, max_images, skip_bad, json_out, save_masks,
            )  # fmt: skip
        else:
            result = _evaluate_zero_shot(
                dzad, test_set, stage, split_list(categories), (source, source_categories),
                save_maps, save_masks, skip_bad, json_out,
            )  # fmt: skip
    if json_out:
        print(json.dumps(result))
    else:
        print_metrics(result, out)


def _test_set(data, normal, abnormal, masks, categories, regime, skip_bad) -> TestSet:
    """``--data ROOT`` (:class:`dzad.data.test_sets.MVTecRoot`) or the plain folders
    ``--normal``/``--abnormal``/``--masks`` (:class:`dzad.data.test_sets.FolderSet`, one category,
    listed here so that an empty folder or a missing mask stops before the model loads; the
    evaluation reuses this listing); any other mix is refused."""
    folders = (normal, abnormal, masks)
    if data is not None and any(f is not None for f in folders):
        raise typer.BadParameter("give --data ROOT or --normal/--abnormal [--masks], not both")
    if data is not None:
        return MVTecRoot(data)
    if normal is None or abnormal is None:
        raise typer.BadParameter("give --data ROOT (MVTec layout) or --normal DIR --abnormal DIR")
    if categories or regime:
        raise typer.BadParameter(
            "--normal/--abnormal are one category scored per image: no --categories, "
            "--batch-zero-shot or --few-shot (those need --data ROOT)"
        )
    folders = FolderSet(normal, abnormal, masks)
    folders.samples(folders.category, skip_bad)
    return folders


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A staging folder whose outputs replace the previous run's in ``out`` whole, on success
    only (:func:`dzad.io_utils.replace_outputs`); a full disk is one line naming ``out``."""
    from dzad.evaluation_outputs import OUTPUTS  # not at import: it imports torch

    try:
        with replace_outputs(out, OUTPUTS) as stage:
            yield stage
    except OSError as exc:
        raise write_error(out, exc) from None


def _progress(dzad, data: TestSet, names: list[str], eval_cfg, skip_bad: bool, json_out: bool):
    """The progress display over the test images of ``names`` the evaluation will score (the
    listing is the test set's one, :class:`dzad.data.test_sets.TestSet`)."""
    from dzad.evaluation import category_samples

    total = sum(len(category_samples(data, c, eval_cfg, dzad.cfg.seed, skip_bad)) for c in names)
    return progress(not json_out, total, "evaluating")


def _evaluate_zero_shot(
    dzad, data, out, cats, source, save_maps, save_masks, skip_bad, json_out,
) -> dict[str, Any]:  # fmt: skip
    """Per-image (zero-shot) evaluation of ``data`` (a :class:`~dzad.data.test_sets.TestSet`) into
    ``out`` (:func:`dzad.evaluation.evaluate`); ``source``: ``(--source, --source-categories)`` of
    the controls."""
    from dzad.evaluation import build_controls, evaluate, source_batches

    eval_cfg = dzad.cfg.evaluate  # --batch-size / --max-images / --controls: in the settings
    names = data.categories(cats)
    fitted = None
    if eval_cfg.controls:
        refs = _source_refs(dzad, *source)
        missing = [r.root for r in refs if not Path(r.root).is_dir()]
        if not refs or missing:
            where = missing[0] if missing else "sets.source"
            raise DZADInputError(
                where,
                "the controls need the SOURCE normals; pass --source ROOT "
                "(MVTec layout) or --no-controls",
            )
        data_cfg = replace(dzad.cfg.data, skip_bad=skip_bad)
        fitted = build_controls(
            dzad,
            eval_cfg,
            lambda: source_batches(refs, dzad.image_size, data_cfg, eval_cfg.batch_size),
        )
    prog = _progress(dzad, data, names, eval_cfg, skip_bad, json_out)
    with prog:
        return evaluate(
            dzad,
            data,
            names,
            out,
            eval_cfg,
            fitted,
            save_maps=save_maps,
            skip_bad=skip_bad,
            progress=prog.advance,
            pictures=True,
            save_masks=save_masks,
        )


def _evaluate_regime(
    dzad, data, out, cats, regime_params, eval_cfg, few_shot, batch_size, max_images, skip_bad,
    json_out, save_masks,
) -> dict[str, Any]:  # fmt: skip
    """``evaluate --batch-zero-shot`` / ``--few-shot K`` (:mod:`dzad.regime_evaluation`), with
    the pictures and report.html of the regime's maps (few-shot: the first reference draw's)."""
    from dzad.evaluation import control_backbone
    from dzad.regime_evaluation import evaluate_regime

    rc = regime_config(dzad, regime_params)
    given = (("batch_size", batch_size), ("max_images", max_images))
    eval_cfg = replace(eval_cfg, **{k: v for k, v in given if v is not None})
    names = data.categories(cats)
    prog = _progress(dzad, data, names, eval_cfg, skip_bad, json_out)
    with prog:
        result = evaluate_regime(
            dzad, control_backbone(dzad), data, names, out, rc, eval_cfg,
            few_shot=few_shot, skip_bad=skip_bad, progress=prog.advance, pictures=True,
            save_masks=save_masks,
        )  # fmt: skip
    return result
