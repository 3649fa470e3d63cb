"""Orchestration and tracking edge of DZAD: Prefect flows, MLflow tracking, DVC stage entry points.

Importing a ``flows`` module changes nothing in the process. The entry points (the ``dzad``
command's callback in :mod:`flows.cli`, ``python -m flows.serve``, the DVC ``register`` stage
``python -m flows.register``, the test suite's ``conftest.py``) call :func:`telemetry_off` before
MLflow or Prefect is imported (house rule: zero telemetry). Code that runs the flows from its own
Python process calls it first too, or exports the variables of :data:`TELEMETRY_OFF`.
"""

import os

# Every telemetry switch of the tools we run; the tests and benchmarks force these too.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
}
QUIET = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # keeps CLI / DVC logs readable


def telemetry_off() -> None:
    """Set :data:`TELEMETRY_OFF` and :data:`QUIET` in ``os.environ``; a value the user set is kept.

    MLflow decides whether to start its telemetry client when it is imported, so call this before
    importing MLflow or Prefect (child processes, e.g. served flow runs, inherit the variables).
    """
    for name, value in {**TELEMETRY_OFF, **QUIET}.items():
        os.environ.setdefault(name, value)
