"""Study stages: the one place that strings the library's steps into a study (docs/architecture.md).

The ``dzad stage ...`` commands, the DVC stages (``dvc.yaml``) and the Prefect flows all call the
functions of this package; none of them re-implements a step. A study is the cross-dataset protocol
of method.md §11: train on the SOURCE normals (one checkpoint per seed), evaluate on every target,
ablate, report. One module per product (a DVC stage depends on the modules it runs):

- :mod:`dzad.study.layout`: dataset names, cache and seed folders, the seeds' checkpoints;
- :mod:`dzad.study.data`: dataset roots (``prepare``) and resized caches (``preprocess``);
- :mod:`dzad.study.seed_training`: one checkpoint per seed (``train``);
- :mod:`dzad.study.seed_evaluation`: per-seed evaluations, summary, ROC / PR points (``evaluate``);
- :mod:`dzad.study.summaries`: mean ± std over seeds and the JSON files DVC reads;
- :mod:`dzad.study.ablations`: the ablation folder, its metrics and plot points (``ablate``);
- :mod:`dzad.study.report_folder`: the report folder: tables and figures in the paper's layout,
  ``index.md`` (``report``).

Folders (the DVC outputs). Each dataset cache, checkpoint, evaluation, ablation and report folder
is built under a temporary name and swapped in whole, every file is written atomically, so a failed
stage leaves no half-written piece behind (and DVC, which records a stage only when it succeeds,
reruns it):

- ``data/raw/``: synthetic families and fetched sets, plus ``datasets.json`` (counts of every root);
- ``<data.cache_dir>/source/<i>/`` and ``<data.cache_dir>/targets/<name>/``: resized caches;
- ``models/seed_<s>/``: one checkpoint per seed;
- ``runs/eval/<target>/seed_<s>/``: evaluation outputs, ``summary.json`` (mean ± std over seeds).
"""
