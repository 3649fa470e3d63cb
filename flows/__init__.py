"""Orchestration and tracking edge of DZAD: Prefect flows, MLflow tracking, DVC stage entry points.

Importing any ``flows`` module turns usage telemetry off before MLflow or Prefect is imported (house
rule: zero telemetry), and MLflow's artifact progress bars with it. ``setdefault`` keeps an explicit
user choice.
"""

import os

for _name, _value in (
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DO_NOT_TRACK", "true"),
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),  # keeps CLI / DVC logs readable
):
    os.environ.setdefault(_name, _value)
