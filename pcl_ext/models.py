"""The MoCo v2 / PCL encoder: a torchvision ResNet whose ``fc`` is an MLP projection head."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["ARCHS", "Encoder", "build_encoder"]

ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]),
         "resnet34": (BasicBlock, [3, 4, 6, 3]),
         "resnet50": (Bottleneck, [3, 4, 6, 3])}


class Encoder(ResNet):
    """torchvision's ResNet with :meth:`features` split off ``forward``.

    ``forward(x)`` is ``fc(features(x))``: the projection, **not** normalized (as PCL's
    ``base_encoder``; the trainer applies ``F.normalize(dim=1)`` to q, k and the E-step
    features). ``features(x)`` is the pooled backbone output, ``[N, feature_dim]`` (512 for
    ResNet-18/34, 2048 for ResNet-50), for kNN and linear evaluation. Parameter names are
    torchvision's (``conv1.weight``, ``fc.0.weight``, ...), so MoCo/PCL checkpoints map
    one-to-one.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], dim: int):
        super().__init__(block, layers, num_classes=dim)
        self.feature_dim: int = self.fc.in_features

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)          # N x feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))                  # N x dim


def build_encoder(arch: str = "resnet18", dim: int = 128, mlp: bool = True,
                  small_images: bool = False, in_channels: int = 3) -> Encoder:
    """A randomly initialized MoCo v2 encoder (no weights are ever downloaded).

    Args:
        arch: ``"resnet18"`` (default), ``"resnet34"`` or ``"resnet50"``.
        dim: output (embedding) dimension, 128 as in MoCo v2 and PCL.
        mlp: projection head ``Linear(f, f) -> ReLU -> Linear(f, dim)`` with ``f`` the feature
            dimension (MoCo v2); ``False`` keeps a single ``Linear(f, dim)`` (MoCo v1).
        small_images: CIFAR stem for inputs of about 28-64 px: a 3x3 stride-1 ``conv1`` and no
            max-pool, so layer4 sees 4x4 instead of 1x1 at 32 px.
        in_channels: 1 for grayscale inputs, 3 for RGB.
    """
    if arch not in ARCHS:
        raise ValueError(f"build_encoder: unknown `arch` {arch!r}; expected one of {list(ARCHS)}")
    block, layers = ARCHS[arch]
    model = Encoder(block, layers, dim)
    if small_images or in_channels != 3:
        kernel, stride = (3, 1) if small_images else (7, 2)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, kernel // 2, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small_images:
        model.maxpool = nn.Identity()
    if mlp:
        f = model.feature_dim
        model.fc = nn.Sequential(nn.Linear(f, f), nn.ReLU(), model.fc)
    return model
