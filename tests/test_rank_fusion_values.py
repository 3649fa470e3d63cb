"""Rank fusion is the plain mean of the two reference ranks: values worked out by hand."""

from __future__ import annotations

import torch

from dzad.scoring import rank_fusion


def test_fused_score_is_the_mean_of_the_two_ranks_by_hand():
    # 4 references each: sorted reference i sits at rank (i + 0.5) / 4 = .125, .375, .625, .875
    ref_map = torch.tensor([3.0, 0.0, 2.0, 1.0])
    ref_det = torch.tensor([10.0, 40.0, 20.0, 30.0])
    map_score = torch.tensor([1.0, 2.5])
    det_score = torch.tensor([35.0, 10.0])
    # image 0: map 1.0 is reference 1 -> .375; detection 35 is halfway 30..40 -> .75
    # image 1: map 2.5 is halfway 2..3 -> .75; detection 10 is reference 0 -> .125
    expected = torch.tensor([(0.375 + 0.75) / 2, (0.75 + 0.125) / 2])
    torch.testing.assert_close(rank_fusion(map_score, det_score, ref_map, ref_det), expected)
    # the two scores weigh the same: swapping them changes nothing
    torch.testing.assert_close(rank_fusion(det_score, map_score, ref_det, ref_map), expected)


def test_without_references_the_batch_ranks_itself_by_hand():
    # 3 images: ranks 1/6, 1/2, 5/6 in the order of each score
    a = torch.tensor([1.0, 2.0, 3.0])  # ranks 1/6, 1/2, 5/6
    b = torch.tensor([3.0, 1.0, 2.0])  # ranks 5/6, 1/6, 1/2
    expected = torch.tensor([(1 / 6 + 5 / 6) / 2, (1 / 2 + 1 / 6) / 2, (5 / 6 + 1 / 2) / 2])
    torch.testing.assert_close(rank_fusion(a, b), expected)
