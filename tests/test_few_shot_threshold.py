"""Few-shot image decisions from the known-good references (``regime.few_shot_threshold``,
docs/method.md §11.1): each reference scored against the others sets the threshold, so a batch
that is mostly defective is still judged (the batch outlier rule assumes a normal majority)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dzad.backbones import build_backbone
from dzad.config import RegimeConfig
from dzad.data.dataset import Sample
from dzad.regime_outputs import score_rows
from dzad.regimes import IMAGE_OUTLIER_K, image_rule, map_level, outlier_threshold, score_few_shot

SIZE = 32
CFG = RegimeConfig(image_size=SIZE, degrees=(1, 3), dzad_weight=0.0)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)  # the random weights do not depend on the tests run before
    return build_backbone("efficientnet_lite0", random_weights=True)


def _images(n: int, seed: int) -> torch.Tensor:
    """``(n,3,32,32)``: a shared smooth texture plus a little noise (normal look-alikes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(99))
    base = torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear")
    return (base + 0.02 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def test_each_reference_is_scored_against_the_other_references(backbone):
    images, refs = _images(5, 0), _images(4, 1)
    scored = score_few_shot(backbone, images, refs, CFG)
    assert scored.reference_scores is not None and scored.reference_scores.shape == (4,)
    for i in range(4):
        others = torch.cat([refs[:i], refs[i + 1 :]])
        alone = score_few_shot(backbone, refs[i : i + 1], others, CFG)
        torch.testing.assert_close(scored.reference_scores[i], alone.scores[0])


def test_the_images_scores_and_maps_do_not_depend_on_the_rule(tiny_model, backbone):
    """With the DZAD fusion on, the references' rows are put on the images' scale: the images'
    own numbers are those of the batch rule, to the bit."""
    images, refs = _images(6, 2), _images(3, 3)
    cfg = replace(CFG, dzad_weight=0.5, adapt_steps=0)
    by_refs = score_few_shot(backbone, images, refs, cfg, tiny_model)
    by_batch = score_few_shot(backbone, images, refs, replace(cfg, few_shot_threshold="batch"))
    by_batch_dz = score_few_shot(
        backbone, images, refs, replace(cfg, few_shot_threshold="batch"), tiny_model
    )
    assert by_batch.reference_scores is None and by_batch_dz.reference_scores is None
    assert torch.equal(by_refs.scores, by_batch_dz.scores)
    assert torch.equal(by_refs.maps, by_batch_dz.maps)
    assert torch.equal(by_refs.parts["dzad"], by_batch_dz.parts["dzad"])
    assert not torch.equal(by_refs.scores, by_batch.scores)  # the fusion is on
    assert by_refs.reference_scores.shape == (3,)
    assert torch.isfinite(by_refs.reference_scores).all()


def test_the_pixel_level_is_a_quantile_of_the_references_leave_one_out_maps(backbone):
    """Each reference's map is its map scored against the others (at the images' map
    resolution); the level is the highest of their pixels, or ``reference_quantile`` of them."""
    images, refs = _images(5, 6), _images(4, 7)
    scored = score_few_shot(backbone, images, refs, CFG)
    assert scored.reference_maps.shape == (4, 1, SIZE, SIZE)
    for i in range(4):
        others = torch.cat([refs[:i], refs[i + 1 :]])
        alone = score_few_shot(backbone, refs[i : i + 1], others, CFG)
        torch.testing.assert_close(scored.reference_maps[i], alone.maps[0], rtol=1e-4, atol=1e-6)
    highest = float(scored.reference_maps.max())
    top = replace(CFG, reference_quantile=1.0)
    assert map_level(scored.maps, top, scored.reference_maps) == pytest.approx(highest)
    for q in (0.9, CFG.reference_quantile):  # the default: 0.99
        level = map_level(scored.maps, replace(CFG, reference_quantile=q), scored.reference_maps)
        assert (scored.reference_maps > level).float().mean() == pytest.approx(1 - q, abs=1e-3)
    # the batch rule, for comparison, is a different number on the same maps
    assert map_level(scored.maps, CFG) == outlier_threshold(scored.maps, CFG.mask_k)
    assert map_level(scored.maps, CFG) != pytest.approx(highest)


def test_one_reference_has_no_leave_one_out_scores(backbone):
    scored = score_few_shot(backbone, _images(3, 4), _images(1, 5), CFG)
    assert scored.reference_scores is None and scored.reference_maps is None
    batch = score_few_shot(
        backbone, _images(3, 4), _images(4, 5), replace(CFG, few_shot_threshold="batch")
    )
    assert batch.reference_maps is None  # `few_shot_threshold: batch`: the batch rule for both


def test_the_rule_is_the_highest_reference_score_and_a_number_overrides_it():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])  # mostly high: "defective"
    refs = torch.tensor([2.5, 1.5])
    assert image_rule(scores, references=refs).value == 2.5
    assert image_rule(scores, 7.0, refs).value == 7.0
    assert image_rule(scores).value == outlier_threshold(scores, IMAGE_OUTLIER_K)


def test_a_mostly_defective_batch_is_flagged_by_the_references_not_by_the_batch_rule():
    """Five of seven images score high (defective), two like the references: the batch rule takes
    the defective majority for the norm; the references' threshold flags exactly the five."""
    scores = torch.tensor([1.0, 1.2, 3.0, 3.1, 3.3, 2.9, 3.4])
    references = torch.tensor([1.1, 1.3, 0.9, 1.25])  # each against the others
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    samples = [Sample(Path(f"{i}.png"), "c", "test", 1, "d", None) for i in range(7)]
    by_refs = score_rows(samples, labels, 0, scores, references)
    by_batch = score_rows(samples, labels, 0, scores)
    assert [r["decision"] for r in by_refs] == ["normal"] * 2 + ["anomalous"] * 5
    assert [r["decision"] for r in by_batch] == ["normal"] * 7
