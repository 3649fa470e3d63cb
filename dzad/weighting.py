"""Stage weight functions w_n of eq. 13 / Table 4 and the weighted detection score (method.md §6).

Every function is one name: ``dzad`` (``1 + exp(-k(N - n))``, n = 0..N-1; the paper writes 10 - n
for its N = 10, we use N - n so the noisiest bucket keeps the weight 1 + exp(-k) for any N),
``dzad_k<k>`` (same with k from the name, e.g. ``dzad_k1``), ``uniform``, ``snr`` (alpha-bar / (1 -
alpha-bar) at the bucket centre), ``snr_prime`` (discrete -dSNR/dt there), ``exp6`` / ``exp7``
(exp(-6t), exp(-7t), t = bucket centre / T) and ``learned`` (logistic regression on the N stage
means of a labelled SOURCE split; its coefficients are the weights). Scores are computed from a
stored F, so a whole Table-4 ablation reweights one pass of the model (:func:`rescore`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

# annotations only: dzad.config checks detection modes, whose modules import this one
if TYPE_CHECKING:
    from dzad.config import WeightingConfig

FIXED_NAMES = ("dzad", "uniform", "snr", "snr_prime", "exp6", "exp7")


def parse_name(name: str, k: float) -> tuple[str, float]:
    """``"dzad_k1"`` -> ``("dzad", 1.0)``; other names keep the configured k."""
    match = re.fullmatch(r"dzad_k(\d+(?:\.\d+)?)", name)
    if match:
        return "dzad", float(match.group(1))
    if name not in (*FIXED_NAMES, "learned"):
        raise ValueError(
            f"unknown weighting {name!r}; known: {[*FIXED_NAMES, 'learned']} or dzad_k<k>"
        )
    return name, k


def _snr(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    ab = alphas_cumprod.double()[t]
    return ab / (1 - ab)


def weights_by_name(name: str, k: float, n_stages: int, alphas_cumprod: Tensor) -> Tensor:
    """``(N,)`` float32 weights of a fixed (not learned) function of N equal buckets of T steps."""
    base, k = parse_name(name, k)
    if base == "learned":
        raise ValueError("the 'learned' weights come from calibration (fit_learned_weights)")
    t_ = alphas_cumprod.shape[0]
    n = torch.arange(n_stages, dtype=torch.float64)
    centre = (n + 0.5) * t_ / n_stages  # continuous bucket centre
    idx = centre.floor().long().clamp(0, t_ - 1)  # its timestep
    if base == "dzad":
        w = 1 + torch.exp(-k * (n_stages - n))
    elif base == "uniform":
        w = torch.ones(n_stages, dtype=torch.float64)
    elif base == "snr":
        w = _snr(alphas_cumprod, idx)
    elif base == "snr_prime":  # -dSNR/dt by a central difference (one-sided at the ends)
        lo, hi = (idx - 1).clamp(0, t_ - 1), (idx + 1).clamp(0, t_ - 1)
        w = (_snr(alphas_cumprod, lo) - _snr(alphas_cumprod, hi)) / (hi - lo).double()
    else:  # exp6 / exp7
        w = torch.exp(-float(base[3:]) * centre / t_)
    return w.float()


def stage_weights(cfg: WeightingConfig, bank_timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``(N,)`` weights of ``cfg.name`` for the bank's N stages (``bank_timesteps`` ``(N,M)``)."""
    return weights_by_name(cfg.name, cfg.k, int(bank_timesteps.shape[0]), alphas_cumprod)


def stage_means(
    noise_matrix: Tensor, mean: Tensor | None = None, std: Tensor | None = None
) -> Tensor:
    """``(B,N,M)`` -> ``(B,N)``: mean over the M samples, z-scored per stage when mean/std given."""
    x = noise_matrix.float().mean(2)
    if mean is not None:
        x = x - mean.to(x)
    if std is not None:
        x = x / std.to(x)
    return x


def weighted_score(
    noise_matrix: Tensor, weights: Tensor, mean: Tensor | None = None, std: Tensor | None = None
) -> Tensor:
    """eq. 13: ``s = sum_n w_n mean_m F[n, m]`` (optionally standardised per stage) -> ``(B,)``."""
    return stage_means(noise_matrix, mean, std) @ weights.to(noise_matrix.device, torch.float32)


def fit_learned_weights(x: Tensor, labels: Tensor, c: float = 1.0) -> tuple[Tensor, float]:
    """Logistic regression on stage statistics ``x`` ``(B,N)`` with labels ``(B,)`` in {0,1}.

    Fitted on a labelled SOURCE split only. Returns ``(weights (N,), bias)``.
    """
    from sklearn.linear_model import LogisticRegression

    y = labels.detach().cpu().numpy().astype(int)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("the learned weighting needs labelled SOURCE normals AND anomalies")
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit(x.detach().cpu().double().numpy(), y)
    return torch.from_numpy(model.coef_[0]).float(), float(model.intercept_[0])


def rescore(
    noise_matrix: Tensor,
    names: list[str] | tuple[str, ...],
    alphas_cumprod: Tensor,
    *,
    k: float = 3.0,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    learned: tuple[Tensor, float] | None = None,
) -> dict[str, Tensor]:
    """Scores ``(B,)`` of a stored ``F`` ``(B,N,M)`` under each weighting in ``names`` (no model).

    ``learned`` = ``(weights, bias)`` from calibration, needed only when ``"learned"`` is listed.
    """
    out: dict[str, Tensor] = {}
    for name in names:
        if parse_name(name, k)[0] == "learned":
            if learned is None:
                raise ValueError("rescore: 'learned' needs the calibrated (weights, bias)")
            out[name] = weighted_score(noise_matrix, learned[0], mean, std) + learned[1]
        else:
            w = weights_by_name(name, k, int(noise_matrix.shape[1]), alphas_cumprod)
            out[name] = weighted_score(noise_matrix, w, mean, std)
    return out
