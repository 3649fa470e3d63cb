"""Benchmarks: each runs in ``--quick`` mode and prints one JSON line with its figures.

Smoke tests only: no figure is compared against a speed bar (speed targets live in benchmarks/).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.scaling import fit_line
from benchmarks.score import forward_sizes
from dzad.config import DZADConfig, NoiseConfig

REPO = Path(__file__).resolve().parents[1]

# figures every --quick run must print: positive numbers, and numbers of any sign
POSITIVE = {
    "score": ["efficiency_ratio", "efficiency_ratio_cpu", "images_per_s", "matmul_peak_gflops"],
    "memory": ["rss_ratio", "rss_ratio_evaluate", "images_per_s", "peak_rss_mb_24"],
    "train": ["efficiency_ratio", "efficiency_ratio_cpu", "images_per_s", "step_s"],
    "scaling": ["seconds", "cpu_seconds"],
}
NUMBERS = {
    "score": ["gflops_b2", "peak_fraction"],
    "memory": ["rss_growth_mb_24"],
    "train": ["bare_forward_backward_s"],
    "scaling": ["slope_r2", "slope_r2_cpu", "slope_s_per_image", "intercept_s"],
}


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def one_json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_forward_sizes_follow_max_batch_and_ddim_steps():
    cfg = DZADConfig()
    cfg = replace(cfg, noise=NoiseConfig(n_stages=10, m_samples=1, max_batch=256))
    steps = cfg.reconstruction.steps
    assert forward_sizes(cfg, 32) == [256, 64] + [32] * steps
    assert forward_sizes(cfg, 1) == [10] + [1] * steps
    assert sum(forward_sizes(cfg, 7)[:-steps]) == 70


def test_fit_line_recovers_slope_and_r2():
    slope, intercept, r2 = fit_line([50, 100, 200], [12.0, 22.0, 42.0])
    assert slope == pytest.approx(0.2) and intercept == pytest.approx(2.0)
    assert r2 == pytest.approx(1.0)
    _, _, r2_bent = fit_line([50, 100, 200], [10.0, 30.0, 40.0])
    assert r2_bent < 0.95


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_benchmark_prints_one_json_line(name):
    figures = one_json_line(run_benchmark(name, "--quick"))
    assert figures["bench"] == name
    for key in POSITIVE[name] + NUMBERS[name]:
        values = figures[key] if isinstance(figures[key], list) else [figures[key]]
        for v in values:
            assert isinstance(v, (int, float)) and math.isfinite(v), key
            assert v > 0 or key in NUMBERS[name], key
    assert "images_per_s" in figures
    assert figures["loadavg_1m"] >= 0 and figures["torch_threads"] == 1


@pytest.mark.slow
def test_aupro_benchmark_prints_one_json_line():
    args = ("--n-maps", "6", "--size", "48", "--levels", "8")
    figures = one_json_line(run_benchmark("aupro", *args))
    assert figures["max_abs_diff"] < 1e-4 and figures["speedup"] > 0


GPU_PHASES = [
    "versions", "build", "train_b1_ckpt0", "train_b1_ckpt1", "train_b2_ckpt0", "train_b2_ckpt1",
    "train_run", "score_fp32", "score_bf16", "e2e",
]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA answer of --check")
def test_gpu_check_without_cuda_says_so(monkeypatch, capsys):
    from benchmarks import gpu  # in process: a fresh interpreter only adds ~8 s of imports

    monkeypatch.setattr(sys, "argv", ["benchmarks.gpu", "--check"])
    with pytest.raises(SystemExit) as info:
        gpu.main()
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.strip().splitlines() == [
        "error: benchmarks.gpu --check needs a CUDA device and torch.cuda.is_available() is "
        "False; nothing was measured (--cpu-dry-run runs the phases on the CPU)"
    ]


def test_a_failing_phase_prints_its_error_and_the_next_phase_runs(capsys):
    from benchmarks.gpu import phase

    failed: list[str] = []
    phase("broken", lambda: {"x": 1 / 0}, failed)
    phase("fine", lambda: {"value": 2.0}, failed)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["phase"] for line in lines] == ["broken", "fine"]
    assert lines[0]["error"] == "ZeroDivisionError: division by zero"
    assert lines[1]["value"] == 2.0 and "error" not in lines[1]
    assert failed == ["broken"]


@pytest.mark.slow
def test_gpu_cpu_dry_run_prints_every_phase(tmp_path):
    """``--cpu-dry-run``: one JSON line per phase, every phase present and passing, on the CPU."""
    proc = run_benchmark("gpu", "--cpu-dry-run", "--work", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [line["phase"] for line in lines] == GPU_PHASES
    by = {line["phase"]: line for line in lines}
    assert not [name for name, line in by.items() if "error" in line]
    assert by["build"]["context"] == "empty_prompt"  # the tiny SD-1.5 folder's text encoder
    for name in GPU_PHASES[2:6]:
        assert by[name]["images_per_s"] > 0 and by[name]["oom"] is False
    assert by["train_run"]["resumed_from"] == 1 and by["train_run"]["losses_finite"]
    assert by["score_bf16"]["images_per_s"] > 0 and by["score_fp32"]["images_per_s"] > 0
    metrics = json.loads(Path(by["e2e"]["metrics_json"]).read_text())
    assert metrics["mean"]["image_auroc"] == by["e2e"]["image_auroc"]
