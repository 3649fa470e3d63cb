"""Orchestration and tracking edge of DZAD: Prefect flows, MLflow tracking, DVC stage entry points.

Importing any ``flows`` module turns usage telemetry off before MLflow or Prefect is imported (house
rule: zero telemetry), and MLflow's artifact progress bars with it. ``setdefault`` keeps an explicit
user choice.
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

for _name, _value in {
    **TELEMETRY_OFF,
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # keeps CLI / DVC logs readable
}.items():
    os.environ.setdefault(_name, _value)
