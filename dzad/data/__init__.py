"""Datasets in the MVTec AD layout: read (``images``, ``dataset``), make (``synth``), bring in
(``fetch``, ``convert``) and cache (``preprocess``). Import the submodules directly."""
