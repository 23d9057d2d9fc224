"""The NVILA multimodal projector with the reference module layout (state-dict keys ``layers.N.*``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NVILAConfig


class SpaceToChannel(nn.Module):
    """k x k space-to-channel on a square token map: (B, S*S, C) → (B, ceil(S/k)^2, k*k*C).

    The map is zero-padded at the bottom/right to a multiple of k; each k x k block's tokens are
    concatenated row-major along channels (reference ``flat_square_2x2`` / ``flat_square_3x3``).
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = math.isqrt(n)
        k = self.k
        x = x.reshape(b, side, side, c)
        pad = (-side) % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        s = (side + pad) // k
        x = x.reshape(b, s, k, s, k, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, s * s, k * k * c)


class MultimodalProjector(nn.Module):
    """``mlp_downsample`` / ``mlp_downsample_2x2_fix`` / ``mlp_downsample_3x3_fix``."""

    def __init__(self, config: NVILAConfig):
        super().__init__()
        c, h = config.mm_hidden_size, config.llm.hidden_size
        k = config.projector.downsample
        if k == 2:
            layers = [SpaceToChannel(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(), nn.Linear(h, h)]
        else:
            layers = [
                SpaceToChannel(3), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                nn.LayerNorm(3 * c), nn.Linear(3 * c, h), nn.GELU(), nn.Linear(h, h),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
