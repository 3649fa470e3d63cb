"""Every MLflow call of DZAD: runs, parameters, metrics, artifacts, the model registry, promotion.

Store: ``TrackingConfig.tracking_uri`` (default ``sqlite:///mlflow.db``, relative to the working
directory) unless ``MLFLOW_TRACKING_URI`` names another one (a shared server). An experiment created
here keeps its artifacts under ``TrackingConfig.artifact_root`` (``mlartifacts/``) when the store is
local. Telemetry: the entry points call :func:`flows.telemetry_off` before MLflow is imported.

Runs are passed around as an ``ActiveRun``, a ``Run`` or a run id, and every write goes through an
``MlflowClient`` with that explicit id, so Prefect tasks in worker threads can log to one run.

Names: training metrics ``train/<name>`` per step; evaluation metrics
``<target>/<category>/<metric>`` and ``<target>/mean/<metric>``. Registry: aliases, never stages --
``candidate`` is the newest registered version, ``champion`` the promoted one
(:func:`flows.tracking.promotion.promote`).

Modules: :mod:`flows.tracking.runs` (the store, runs, parameters, tags, metrics),
:mod:`flows.tracking.training` (loss curve, checkpoint artifacts), :mod:`flows.tracking.results`
(evaluation metrics, AUROC tables, evaluation artifacts), :mod:`flows.tracking.registry` (pyfunc
model, registered versions, registry URIs) and :mod:`flows.tracking.promotion`.
"""
