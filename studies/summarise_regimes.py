"""Mean ± std of ``explore_regimes.py`` JSON lines, and the setting a selection target picks.

    python studies/summarise_regimes.py --select A.jsonl... --report B.jsonl... [--pixel-only]

Rows are grouped by (regime, part, degrees, rescore_k, adaptation steps, fusion weight, DZAD
tiles, DZAD shifts, re-weighting on top of a reference selection, K, input size, the adaptation's
rounds / drop / learning rate; ``part`` of
``explore_fusions.py`` lines: the fusion form, ``form`` in older ones); cells are mean ± sample
std over checkpoints (seeds) and, for few-shot, reference draws.
The setting of each regime is picked on the ``--select`` files (the other dev direction's target)
by the mean of image and pixel AUROC (``--pixel-only``: pixel AUROC first, image AUROC breaking
ties, for a target whose image metric is confounded), and printed with its numbers on the
``--report`` files; nothing is picked on those.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics as st

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def groups(files: list[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = collections.defaultdict(list)
    for f in files:
        with open(f) as lines:
            records = [json.loads(line) for line in lines if line.strip()]
        for r in records:
            if "what" in r:
                continue
            key = (
                r["regime"],
                r.get("part", r.get("form")),
                tuple(r.get("degrees", ())),
                r.get("rescore_k", 0),
                r.get("steps", -1),
                r.get("weight", 1.0 if r.get("part") == "dzad" else 0.0),
                r.get("tiles", 1),
                r.get("shifts", 1),
                r.get("rw", 0.0),
                r.get("k", 4),
                r.get("size", 256),
                (r.get("rounds", 2), r.get("drop", 0.2), r.get("lr", 1e-4)),
            )
            out[key].append(r)
    return out


def cell(rows: list[dict], m: str) -> str:
    xs = [r[m] for r in rows]
    return f"{st.mean(xs):.3f}" + (f" ± {st.stdev(xs):.3f}" if len(xs) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--select", nargs="+", required=True)
    ap.add_argument("--report", nargs="+", required=True)
    ap.add_argument("--pixel-only", action="store_true")
    args = ap.parse_args()
    select, report = groups(args.select), groups(args.report)

    def score(rows: list[dict]) -> tuple[float, float]:
        pixel = st.mean(round(r["pixel_auroc"], 4) for r in rows)
        image = st.mean(r["image_auroc"] for r in rows)
        return (pixel, image) if args.pixel_only else ((pixel + image) / 2, 0.0)

    for regime in ("batch", "few"):
        cands = {k: v for k, v in select.items() if k[0] == regime and k[1] != "dzad"}
        best = max(cands, key=lambda k: score(cands[k]))
        print(f"{regime}: picked {best} (selection score {score(cands[best])[0]:.3f})")
        for key in sorted(k for k in report if k[0] == regime):
            rows = report[key]
            seeds = len({r.get("ckpt", "") for r in rows})
            mark = " <- picked" if key == best else ""
            cells = " | ".join(cell(rows, m) for m in METRICS)
            print(f"| {key[1:]} | {len(rows)} rows, {seeds} ckpt | {cells} |{mark}")


if __name__ == "__main__":
    main()
