"""The UNet every method shares (Ronneberger et al. 2015, as in the CM-UNet paper).

Encoder: a DoubleConv stem and 4 down blocks (max-pool, DoubleConv) with widths w, 2w, 4w, 8w and a
16w bottleneck. Decoder: 4 up blocks (ConvTranspose2d 2x2 stride 2, concatenate the skip,
DoubleConv). Head: a 1x1 convolution. DoubleConv = 2 x [conv3x3 (no bias), BatchNorm, ReLU].
With w=64 and a 2-class head the network has 31.04 M parameters, the paper's figure.

Pre-training methods use ``encoder`` and ``decoder`` as parts; fine-tuning loads their weights into
a :class:`UNet` and trains a fresh ``head``.
"""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(cin, cout))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin // 2 + cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Encoder(nn.Module):
    """Image (B, C, H, W) -> features at 5 scales, widths (w, 2w, 4w, 8w, 16w); H, W % 16 == 0."""

    def __init__(self, width: int = 64, in_channels: int = 1):
        super().__init__()
        self.widths = [width * 2**i for i in range(5)]
        self.stem = DoubleConv(in_channels, width)
        self.downs = nn.ModuleList(Down(a, b) for a, b in zip(self.widths, self.widths[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        return features


class Decoder(nn.Module):
    """Features at 5 scales -> a (B, w, H, W) feature map, using the skips."""

    def __init__(self, width: int = 64):
        super().__init__()
        widths = [width * 2**i for i in range(5)]
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(4)))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        return x


class UNet(nn.Module):
    def __init__(self, width: int = 64, in_channels: int = 1, out_channels: int = 2):
        super().__init__()
        self.width = width
        self.encoder = Encoder(width, in_channels)
        self.decoder = Decoder(width)
        self.head = nn.Conv2d(width, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x)
        return self.head(self.decoder(self.encoder(x)))


def check_input_size(x: torch.Tensor) -> None:
    if x.shape[-1] % 16 or x.shape[-2] % 16:
        raise ValueError(f"UNet input sides must be multiples of 16, got {tuple(x.shape[-2:])}")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
