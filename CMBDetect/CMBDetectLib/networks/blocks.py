"""Building blocks shared by the stage-1 U-Net, the teacher and the student.

Kept in one place so the teacher's feature extractor is *literally* the stage-1 encoder (same module
names), which lets it be initialised from stage-1 weights with a plain ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    """Two consecutive 3x3x3 convolutions, each followed by batch norm and ReLU.

    Batch norm (not instance norm) on purpose: in eval mode it is a fixed per-channel affine map, so a
    window's output does not depend on the window's own statistics and sliding-window inference agrees
    with whole-volume inference.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class ShallowEncoder(nn.Module):
    """Feature extractor T_f: 1x1x1 projection to 3 channels, then three levels of two 3x3x3 convs
    (``width``, ``2*width``, ``4*width`` filters) separated by two 2x2x2 max-pooling layers.

    Returns the output of every level so the decoder can use skip connections and the classifier arm
    can read the third (deepest) level.
    """

    def __init__(self, in_channels: int = 2, width: int = 16) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.width = width
        self.projection = nn.Conv3d(in_channels, 3, kernel_size=1)
        self.level1 = DoubleConv(3, width)
        self.level2 = nn.Sequential(nn.MaxPool3d(2), DoubleConv(width, 2 * width))
        self.level3 = nn.Sequential(nn.MaxPool3d(2), DoubleConv(2 * width, 4 * width))

    @property
    def out_channels(self) -> tuple[int, int, int]:
        return (self.width, 2 * self.width, 4 * self.width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[1] > self.in_channels:
            # Feature channels have a fixed order (features.CHANNELS): a network reads the leading ones it
            # was built for, so stage 1 (image + FRST) runs on the same features as a 3-channel student.
            x = x[:, :self.in_channels]
        x1 = self.level1(self.projection(x))
        x2 = self.level2(x1)
        x3 = self.level3(x2)
        return x1, x2, x3


class UpBlock(nn.Module):
    """2x2x2 upsampling, concatenation with the encoder's skip features, two 3x3x3 convolutions."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        # Trilinear upsampling (no weights): cheaper than a transposed convolution and free of its
        # checkerboard artefacts, which would look like tiny bright dots - exactly what we detect.
        self.upsample = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.upsample(x)], dim=1))


class PatchClassifierArm(nn.Module):
    """Patch-level classifier T_c (paper section 2.3.1).

    Reads the deepest encoder level: 1x1x1 projection, two 3x3x3 convolutions and a pooling layer per
    level of abstraction, then FC-1024 -> dropout 0.2 -> FC-128 -> FC-32 -> 2 logits. The feature map
    is pooled to ``pooled_size``^3 before flattening so the first FC layer (the biggest tensor of the
    whole model) stays small whatever the patch size.
    """

    def __init__(self, in_channels: int, channels: int = 32, levels: int = 1,
                 fc: tuple[int, ...] = (1024, 128, 32), dropout: float = 0.2,
                 pooled_size: int = 3, n_classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, kernel_size=1)]
        for _ in range(levels):
            layers += [DoubleConv(channels, channels), nn.MaxPool3d(2, ceil_mode=True)]
        layers.append(nn.AdaptiveAvgPool3d(pooled_size))
        self.features = nn.Sequential(*layers)
        dense: list[nn.Module] = [nn.Flatten()]
        previous = channels * pooled_size ** 3
        for index, units in enumerate(fc):
            if index == 1:
                dense.append(nn.Dropout(dropout))  # the paper's 20 % dropout sits before FC-128
            dense += [nn.Linear(previous, units), nn.ReLU(inplace=True)]
            previous = units
        dense.append(nn.Linear(previous, n_classes))
        self.classifier = nn.Sequential(*dense)

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(deepest))
