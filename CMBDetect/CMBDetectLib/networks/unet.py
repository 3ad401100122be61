"""Stage-1 candidate detector: the shallow 3D U-Net of Sundaresan et al. (paper section 2.2, Fig. 3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from CMBDetectLib.networks.blocks import ShallowEncoder, UpBlock

CMB_PRIOR = 0.01  # initial CMB probability of every voxel (see ShallowUNet.__init__)


class ShallowUNet(nn.Module):
    """Shallow U-Net with two pooling levels.

    ``in_channels`` (image + FRST) -> 1x1x1 projection to 3 -> 3x3x3 convs to ``width`` -> two
    pooling levels (``2*width``, ``4*width``) -> upsampling decoder with skip connections -> 1x1x1 conv
    -> ``n_classes`` **logits** (callers apply the softmax). The paper uses ``width=64``; the bundled
    model is narrower so it trains and runs on a laptop CPU. Input sizes must be multiples of 4.
    """

    def __init__(self, in_channels: int = 2, width: int = 16, n_classes: int = 2) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "width": width, "n_classes": n_classes}
        self.encoder = ShallowEncoder(in_channels, width)
        self.up2 = UpBlock(4 * width, 2 * width, 2 * width)
        self.up1 = UpBlock(2 * width, width, width)
        self.head = nn.Conv3d(width, n_classes, kernel_size=1)
        # Start from the class prior (CMB voxels are ~0.01-0.1 % of a patch): with an unbiased head every
        # voxel starts at p = 0.5 and hundreds of steps go into pushing the background down before any
        # spatial pattern is learned - long enough for the paper's fast lr decay to freeze training.
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[1:] = math.log(CMB_PRIOR / (1.0 - CMB_PRIOR))

    def decode(self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Voxel-wise logits from the encoder's three levels (the teacher's segmentor T_s)."""
        x1, x2, x3 = features
        return self.head(self.up1(self.up2(x3, x2), x1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encoder(x))
