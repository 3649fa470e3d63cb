"""``python -m flows.serve``: serve ``dzad/train``, ``dzad/evaluate`` and ``dzad/ablation``.

All three are deployments of the one orchestrator flow ``dzad`` (``flows/pipeline.py``); they differ
in their default ``stage`` parameter. ``prefect.serve`` registers them with the Prefect API named by
``PREFECT_API_URL`` and runs every flow run they get in a subprocess of this one: no work pool, no
worker, nothing to deploy first (docs/prefect.md says why this, and how to use a work pool instead).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flows import telemetry_off

# Prefect and the flow (which imports MLflow) load inside the functions: main() turns telemetry
# off first.
if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DESCRIPTIONS = {
    "train": "Prepare + preprocess the data, train every seed on the SOURCE normals, calibrate.",
    "evaluate": "Train (cached) or take -p checkpoint=..., then evaluate every target.",
    "ablation": "Train + evaluate (cached), then the Table 4 / Figure 4 / Table 3 arms.",
}


def deployments(
    params_file: str = "params.yaml", out_dir: str = "runs/prefect"
) -> list[RunnerDeployment]:
    """One deployment per stage; every other parameter keeps the flow's default (None = YAML)."""
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import STAGES, dzad

    return [
        dzad.to_deployment(
            name=stage,
            parameters={"stage": stage, "params_file": params_file, "out_dir": out_dir},
            description=DESCRIPTIONS[stage],
            tags=["dzad", stage],
            # `flows.pipeline.dzad`, imported like any module: independent of the working directory.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for stage in STAGES
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--params-file", default="params.yaml", help="default params YAML")
    parser.add_argument("--out-dir", default="runs/prefect", help="default output root")
    parser.add_argument(
        "--limit",
        type=int,
        default=1,
        help="flow runs executed at once (1: two trainings never share one GPU)",
    )
    parser.add_argument(
        "--pause-on-shutdown",
        action="store_true",
        help="pause the deployments through the API when stopped (they have no schedules, and "
        "without a reachable server the stop then hangs)",
    )
    args = parser.parse_args(argv)
    telemetry_off()  # before Prefect and MLflow are imported; served flow runs inherit it
    from prefect import serve

    serve(
        *deployments(args.params_file, args.out_dir),
        limit=args.limit,
        pause_on_shutdown=args.pause_on_shutdown,
    )


if __name__ == "__main__":
    main()
