"""Scoring speed: ``dzad score`` on the ``demo`` study against the bare network forwards it needs.

``python -m benchmarks.score [--batch-sizes 1 8 32] [--latent L] [--no-compile] [--quick]`` prints
one JSON line. For each batch size B it runs the ``dzad score`` command function itself
(``dzad.cli.score_cmds.score_cmd``: PNG decoding, DZAD forward with encoder, noise features, DDIM,
maps, gating, ``scores.csv`` and ``report.html``; its defaults, so no pictures) on synthetic PNGs,
the same with ``--pictures`` (heat map, panel and thumbnail PNGs per image), with the checkpoint
loaded once beforehand (``load_s``), and then, in the same process, only the denoiser+SG forwards
that scoring B images needs: ``ceil(B*N*M / max_batch)`` noise-feature batches plus
``reconstruction.steps`` DDIM batches of B, reusing the batch's SG hint embedding (computed once
for each of the two). The three are timed ``--repeats`` times, interleaved, on ``max(2B, 6)``
images after a warm-up run; medians are reported.

Fields per B: ``images_per_s_bB`` (the command, wall clock) and ``images_per_s_cpu_bB`` (per CPU
second of this process), ``efficiency_ratio_bB`` (wall time per image / bare forwards' wall time
per image; bar 1.25) and ``efficiency_ratio_cpu_bB`` (the same on CPU time, which other jobs on a
shared machine do not inflate), ``efficiency_ratio_pictures_bB`` / ``..._pictures_cpu_bB`` (the
command with ``--pictures``), ``pictures_ms_per_image_cpu_bB`` (what ``--pictures`` adds, CPU ms),
``gflops_bB`` / ``bare_gflops_bB`` (FLOPs of those forwards per CPU second of the command / of the
bare forwards); the unsuffixed fields are the largest batch's.
Variants of the bare forwards at batch 8 (``variant_ms_per_image``, CPU ms): autograd ``no_grad``,
``inference_mode`` (the library's), ``channels_last`` and ``torch.compile`` (its compile time:
``compile_s``; ``compile_max_rel_diff``: largest difference of its noise predictions from eager,
relative to the largest eager value; ``compile_score_max_rel_diff``: the same for the DZAD image
score, detection score and map of 8 images, the largest of the three).
``precision_ms_per_image`` (CPU ms of the DZAD forward at batch 8 in ``noise.precision`` fp32 and
bf16, interleaved), ``bf16_speedup`` (fp32 / bf16) and ``bf16_max_rel_diff`` (image scores,
relative to the largest). ``matmul_peak_gflops`` is an fp32
matmul per CPU second measured by the same script; ``peak_fraction`` is the largest batch's
``gflops`` over it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from benchmarks._common import (
    Span,
    add_common_args,
    build_model,
    demo_config,
    emit,
    forwards_per_image,
    link_images,
    matmul_peak_gflops,
    median_span,
    setup,
    stopwatch,
    synthetic_images,
    timed,
    with_precision,
    write_pngs,
)
from dzad.networks import forward_flops


def forward_sizes(cfg, batch: int) -> list[int]:
    """Batch sizes of the ``predict_noise`` calls scoring ``batch`` images makes, in order."""
    pairs = batch * cfg.noise.n_stages * cfg.noise.m_samples
    chunks = [min(cfg.noise.max_batch, pairs - s) for s in range(0, pairs, cfg.noise.max_batch)]
    return chunks + [batch] * cfg.reconstruction.steps


def flops_per_image(model) -> int:
    """FLOPs of the network scoring one image (torch's FlopCounterMode): ``forwards_per_image``
    forwards reusing the SG hint embedding, plus the two embeddings (noise features, DDIM)."""
    c, h, _ = model.encoder.latent_shape(model.image_size)
    per_forward, per_embedding = forward_flops(model.net, c, h)
    return per_forward * forwards_per_image(model.cfg) + 2 * per_embedding


def bare_forwards(model, batch: int, memory_format=torch.contiguous_format) -> Callable[[], None]:
    """A callable that runs exactly the denoiser+SG forwards of one scoring batch of ``batch``,
    with the SG hint embedding of the batch computed once for the noise features and once for the
    reconstruction and its rows reused by their forwards, as scoring does."""
    cfg = model.cfg
    c, h, w = model.encoder.latent_shape(model.image_size)
    size, t_max = model.image_size, cfg.model.num_train_timesteps
    gen = torch.Generator().manual_seed(0)
    hint = torch.rand((batch, 3, size, size), generator=gen)
    hint = hint.to(model.device, memory_format=memory_format)
    nm = cfg.noise.n_stages * cfg.noise.m_samples
    chunks = list((torch.arange(batch * nm) // nm).split(cfg.noise.max_batch))  # image per pair
    rows = chunks + [torch.arange(batch)] * cfg.reconstruction.steps
    assert [len(r) for r in rows] == forward_sizes(cfg, batch)
    inputs = []
    for r in rows:
        n = len(r)
        z = torch.randn((n, c, h, w), generator=gen).to(model.device, memory_format=memory_format)
        t = torch.randint(0, t_max, (n,), generator=gen).to(model.device)
        inputs.append((z, t, r.to(model.device)))

    def run() -> None:
        embedded, z_batch = None, inputs[-1][0]  # a (B, C, h, w) DDIM latent
        for i, (z, t, r) in enumerate(inputs):
            if i in (0, len(chunks)):  # noise features, then reconstruction
                embedded = model.net.embed_hint(model.net.hint(hint, z_batch), z_batch)
            emb = None if embedded is None else embedded[r]
            model.net.predict_noise(z, t, None, hint_embedding=emb)

    return run


def score_command(
    model, ckpt: Path, images: Path, out: Path, batch: int, pictures: bool = False
) -> Span:
    """Time of the ``dzad score`` command function on ``images`` (model preloaded; its default
    outputs, or with ``pictures`` those of ``--pictures`` too)."""
    from dzad.cli import score_cmds

    with (
        mock.patch.object(score_cmds, "load_model", lambda *_: model),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        lap = stopwatch()
        score_cmds.score_cmd(
            paths=[str(images)],
            model=str(ckpt),
            out=out,
            threshold="auto",
            save_maps=False,
            save_masks=False,
            pictures=pictures,
            json_out=True,
            skip_bad=False,
            random_backbone=False,
            batch_size=batch,
            threads=None,  # the process's own (``--threads``), applied by setup()
            compile_=None,  # the checkpoint's runtime.compile: the library's default
            batch_zero_shot=False,  # the per-image (zero-shot) regime
            reference=None,
            regime_params=None,
            config=None,  # the checkpoint's config, unchanged
            set_=None,
        )
        return lap()


def variants(
    model, batch: int, compile_too: bool, repeats: int
) -> tuple[dict[str, float | None], float | None]:
    """CPU milliseconds per image of the bare forwards of one batch under each execution variant,
    and the wall seconds ``torch.compile`` took (None when skipped)."""
    out: dict[str, float | None] = {}
    compile_s = None
    with torch.no_grad():
        out["no_grad"] = timed(bare_forwards(model, batch), repeats).cpu / batch * 1e3
    with torch.inference_mode():
        out["inference_mode"] = timed(bare_forwards(model, batch), repeats).cpu / batch * 1e3
        model.net.to(memory_format=torch.channels_last)
        run = bare_forwards(model, batch, torch.channels_last)
        out["channels_last"] = timed(run, repeats).cpu / batch * 1e3
        model.net.to(memory_format=torch.contiguous_format)
        out["compile"] = None
        if compile_too:
            plain = model.net.predict_noise
            z, t = (
                torch.randn((batch, *model.encoder.latent_shape(model.image_size))),
                torch.randint(0, 1000, (batch,)),
            )
            hint = torch.rand((batch, 3, model.image_size, model.image_size))
            emb = model.net.embed_hint(model.net.hint(hint, z), z)  # as scoring calls it
            eager = plain(z, t, None, hint_embedding=emb)
            images = synthetic_images(batch, model.image_size, seed=11)
            eager_scores = model(images)
            model.net.predict_noise = torch.compile(plain, dynamic=False)
            try:
                run = bare_forwards(model, batch)
                start = time.perf_counter()
                run()  # compiles once per distinct batch shape
                compile_s = time.perf_counter() - start
                out["compile"] = timed(run, repeats).cpu / batch * 1e3
                compiled = model.net.predict_noise(z, t, None, hint_embedding=emb)
                out["compile_max_rel_diff"] = _rel_diff(compiled, eager)
                scores = model(images)  # the same batch shapes: nothing recompiles
                out["compile_score_max_rel_diff"] = max(
                    _rel_diff(getattr(scores, k), getattr(eager_scores, k))
                    for k in ("image_score", "detection_score", "anomaly_map")
                )
            finally:
                model.net.predict_noise = plain
    return out, compile_s


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` relative to the largest ``|b|``."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def precision_pair(model, batch: int, repeats: int) -> dict[str, object]:
    """CPU ms per image of the DZAD forward on ``batch`` images in fp32 and bf16
    (``noise.precision``, interleaved rounds), the speed-up and the image scores' difference."""
    x = synthetic_images(batch, model.image_size, seed=7)
    models = {p: with_precision(model, p) for p in ("fp32", "bf16")}
    spans: dict[str, list[Span]] = {p: [] for p in models}
    scores = {p: m(x).image_score.float() for p, m in models.items()}  # warm-up, and the scores
    for _ in range(repeats):
        for p, m in models.items():
            spans[p].append(timed(lambda m=m: m(x), repeats=1, warmup=0))
    ms = {p: median_span(v).cpu / batch * 1e3 for p, v in spans.items()}
    return {
        "precision_batch": batch,
        "precision_ms_per_image": ms,
        "bf16_speedup": ms["fp32"] / ms["bf16"],
        "bf16_max_rel_diff": _rel_diff(scores["bf16"], scores["fp32"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--latent", default=None, help="override the demo study's model.latent")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    add_common_args(parser)
    args = parser.parse_args()
    setup(args)
    sizes = [2] if args.quick else args.batch_sizes
    cfg = demo_config(args.latent, quick=args.quick)
    from dzad.cli.model_options import load_model

    peak = matmul_peak_gflops(512 if args.quick else 1024)
    with tempfile.TemporaryDirectory(prefix="dzad-bench-") as tmp:
        tmp_path = Path(tmp)
        build_model(cfg, n_source=4 if args.quick else 16).save(tmp_path / "ckpt")
        start = time.perf_counter()
        model = load_model(str(tmp_path / "ckpt"), False)
        load_s = time.perf_counter() - start
        flops_image = flops_per_image(model)
        n_max = max(max(2 * b, 6) for b in sizes)
        pngs = write_pngs(tmp_path / "images", n_max, cfg.data.image_size)
        figures: dict[str, object] = {
            "bench": "score",
            "latent": cfg.model.latent,
            "image_size": cfg.data.image_size,
            "forwards_per_image": forwards_per_image(cfg),
            "gflop_per_image": flops_image / 1e9,
            "load_s": load_s,
            "matmul_peak_gflops": peak,
        }
        for b in sizes:
            n = max(2 * b, 6)
            folder = link_images(pngs[:n], tmp_path / f"in_{b}")
            score_command(model, tmp_path / "ckpt", folder, tmp_path / f"warm_{b}", b)  # warm-up
            fulls, drawn, bares = [], [], []
            for r in range(args.repeats):  # interleaved: load drifts affect all three alike
                out = tmp_path / f"out_{b}_{r}"
                fulls.append(score_command(model, tmp_path / "ckpt", folder, out, b) / n)
                out = tmp_path / f"pictures_{b}_{r}"
                drawn.append(score_command(model, tmp_path / "ckpt", folder, out, b, True) / n)
                with torch.inference_mode():
                    bares.append(timed(bare_forwards(model, b), repeats=n // b, warmup=0) / b)
            full, pics, bare = median_span(fulls), median_span(drawn), median_span(bares)
            figures[f"images_per_s_b{b}"] = 1 / full.wall
            figures[f"images_per_s_cpu_b{b}"] = 1 / full.cpu
            figures[f"efficiency_ratio_b{b}"] = full.wall / bare.wall
            figures[f"efficiency_ratio_cpu_b{b}"] = full.cpu / bare.cpu
            figures[f"efficiency_ratio_pictures_b{b}"] = pics.wall / bare.wall
            figures[f"efficiency_ratio_pictures_cpu_b{b}"] = pics.cpu / bare.cpu
            figures[f"pictures_ms_per_image_cpu_b{b}"] = (pics.cpu - full.cpu) * 1e3
            figures[f"gflops_b{b}"] = flops_image / full.cpu / 1e9
            figures[f"bare_gflops_b{b}"] = flops_image / bare.cpu / 1e9
        top = max(sizes)
        keys = ("images_per_s", "images_per_s_cpu", "efficiency_ratio", "efficiency_ratio_cpu")
        for key in (*keys, "efficiency_ratio_pictures", "efficiency_ratio_pictures_cpu"):
            figures[key] = figures[f"{key}_b{top}"]
        v_batch = min(8, top)
        figures["variant_batch"] = v_batch
        figures["variant_ms_per_image"], figures["compile_s"] = variants(
            model, v_batch, not (args.no_compile or args.quick), args.repeats
        )
        figures.update(precision_pair(model, v_batch, args.repeats))
        figures["peak_fraction"] = figures[f"gflops_b{top}"] / peak  # type: ignore[operator]
    emit(figures)


if __name__ == "__main__":
    main()
