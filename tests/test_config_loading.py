"""dzad.config: loading, defaults, round trips and the edges of every range (tests/test_faults.py
checks the refusals of one-line errors; this file checks what is accepted and where the edges are).
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from dzad import config
from dzad.config import Bound


def test_every_range_names_a_numeric_field():
    """A range under a misspelt key would never be applied."""
    for key in config.RANGES:
        section, name = key.split(".")
        hints = typing.get_type_hints(type(getattr(config.DZADConfig(), section)))
        assert name in hints, key
        assert any(t in str(hints[name]) for t in ("int", "float")), key


@pytest.mark.parametrize(
    ("bound", "inside", "outside", "text"),
    [
        (Bound(), [0, 5.5], [-1e-9], ">= 0"),
        (Bound(1), [1, 2], [0.999], ">= 1"),
        (Bound(0, lo_open=True), [1e-12], [0, -1], "> 0"),
        (Bound(0, 1), [0, 1], [-1e-9, 1.000001], ">= 0 and <= 1"),
        (Bound(0, 1, hi_open=True), [0, 0.999], [1], ">= 0 and < 1"),
        (Bound(0, 1, lo_open=True), [1, 1e-9], [0], "> 0 and <= 1"),
        (Bound(None), [-1e9, 0, 1e9], [], "any value"),
    ],
)
def test_bound_edges_and_wording(bound, inside, outside, text):
    assert all(bound.allows(v) for v in inside)
    assert not any(bound.allows(v) for v in outside)
    assert str(bound) == text


@pytest.mark.parametrize(
    ("raw", "key", "value"),
    [  # the edge values themselves are allowed
        ({"detection": {"threshold_quantile": 0}}, "detection.threshold_quantile", 0.0),
        ({"detection": {"threshold_quantile": 1}}, "detection.threshold_quantile", 1.0),
        ({"detection": {"calibration_holdout": 0}}, "detection.calibration_holdout", 0.0),
        ({"data": {"mask_threshold": 255}}, "data.mask_threshold", 255),
        ({"anomaly_map": {"w_pn": 1}}, "anomaly_map.w_pn", 1.0),
        ({"anomaly_map": {"w_pa_floor": 1}}, "anomaly_map.w_pa_floor", 1.0),
        ({"train": {"ema_decay": 1}}, "train.ema_decay", 1.0),
        ({"weighting": {"k": -2.5}}, "weighting.k", -2.5),  # any finite k
        ({"train": {"steps": 1}}, "train.steps", 1),
        ({"seed": 0}, "seed", 0),
    ],
)
def test_edge_values_are_accepted(raw, key, value):
    flat = config.flatten(config.from_dict(raw))
    assert flat[key] == value and type(flat[key]) is type(value)


@pytest.mark.parametrize(
    ("raw", "allowed"),
    [  # just past the edges
        ({"detection": {"calibration_holdout": 1}}, "< 1"),
        ({"detection": {"temperature": 0}}, "> 0"),
        ({"anomaly_map": {"w_pn": 0.99}}, ">= 1"),
        ({"train": {"ema_decay": 1.01}}, "<= 1"),
        ({"evaluate": {"mutual_fraction": 0}}, "> 0"),
        ({"noise": {"m_samples": 0}}, ">= 1"),
        ({"train": {"weight_decay": -0.1}}, ">= 0"),  # unlisted numbers: >= 0
        ({"weighting": {"k": float("nan")}}, "finite"),
        ({"regime": {"levels": [1, 2.5]}}, "an integer"),
    ],
)
def test_values_past_the_edges_are_refused(raw, allowed):
    with pytest.raises(ValueError, match="not allowed") as info:
        config.from_dict(raw)
    assert allowed in str(info.value)


def test_missing_keys_take_the_defaults_section_by_section():
    cfg = config.from_dict({"train": {"steps": 3}})
    assert cfg.train == dataclasses.replace(config.TrainConfig(), steps=3)
    assert dataclasses.replace(cfg, train=config.TrainConfig()) == config.DZADConfig()
    assert config.from_dict({}) == config.DZADConfig()


def test_round_trip_through_plain_data_keeps_every_value():
    cfg = config.from_dict(
        {
            "seeds": [3, 1],
            "sets": {
                "source": [{"root": "a", "categories": ["x", "y"]}],
                "targets": {"t1": {"root": "b"}, "t2": {"root": "c", "categories": ["z"]}},
            },
            "model": {"block_out_channels": [16, 32], "pretrained": "sd", "vae": None},
            "train": {"lr": 1, "mixed_precision": "bf16"},
            "noise": {"views": ["identity", "hflip"]},
        }
    )
    assert cfg.seeds == (3, 1) and cfg.model.block_out_channels == (16, 32)
    assert cfg.sets.source == (config.DatasetRef("a", ("x", "y")),)
    assert cfg.sets.targets["t2"] == config.DatasetRef("c", ("z",))
    assert cfg.model.pretrained == "sd" and cfg.model.vae is None
    plain = config.to_dict(cfg)
    assert plain["seeds"] == [3, 1] and plain["sets"]["source"][0]["categories"] == ["x", "y"]
    assert json.loads(json.dumps(plain)) == plain  # plain JSON types only
    assert config.from_dict(plain) == cfg
    assert config.validate(cfg) == cfg


def test_target_names_are_strings_and_empty_targets_stay_a_key():
    cfg = config.from_dict({"sets": {"targets": {7: {"root": "r"}}}})
    assert list(cfg.sets.targets) == ["7"]
    flat = config.flatten(config.from_dict({"sets": {"targets": {}}}))
    assert flat["sets.targets"] == {}
    assert flat["sets.source"] == [{"root": "data/raw/synth/textures", "categories": []}]
    assert flat["model.profile"] == "demo" and "model" not in flat


def test_load_reads_yaml_1_2_as_dvc_writes_it(tmp_path):
    """`dvc exp run -S train.mixed_precision=no` writes an unquoted no: YAML 1.2 keeps the
    string (YAML 1.1 would read False), and `yes` is no boolean either."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  mixed_precision: no\n  steps: 0x10\n")
    cfg = config.load(path)
    assert cfg.train.mixed_precision == "no" and cfg.train.steps == 16
    path.write_text("train:\n  ema: yes\n")
    with pytest.raises(ValueError, match=r"params\.train\.ema: 'yes'"):
        config.load(path)


def test_load_of_an_empty_missing_or_broken_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert config.load(empty) == config.DZADConfig()
    for path, text in ((tmp_path / "none.yaml", None), (tmp_path / "bad.yaml", "train: [1,\n")):
        if text is not None:
            path.write_text(text)
        with pytest.raises(ValueError) as info:
            config.load(path)
        assert str(info.value).startswith(f"{path}: ")
