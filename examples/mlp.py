"""A stack of GELU MLP blocks with residuals: the simplest model whose memory is all activations.

    memfit analyze examples/mlp.py
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MLPStack(nn.Module):
    def __init__(self, width: int = 512, depth: int = 6, expand: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, expand * width), nn.GELU(), nn.Linear(expand * width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).float().pow(2).mean()


def factory(batch: int = 1024, width: int = 512, depth: int = 6):
    """(model, (x,)): the model returns a scalar loss."""
    torch.manual_seed(0)
    return MLPStack(width, depth), (torch.randn(batch, width),)


def small():
    return factory(batch=32, width=32, depth=3)
