"""Small helpers shared by test files (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses

from dzad.model import DZAD


def with_map(model: DZAD, tau: float | None = None, **changes) -> DZAD:
    """Same parts, other map options (and optionally another threshold tau)."""
    cfg = dataclasses.replace(
        model.cfg, anomaly_map=dataclasses.replace(model.cfg.anomaly_map, **changes)
    )
    calib = model.calibration if tau is None else dataclasses.replace(model.calibration, tau=tau)
    return DZAD(cfg, model.encoder, model.net, model.bank, calib, model.backbone)
