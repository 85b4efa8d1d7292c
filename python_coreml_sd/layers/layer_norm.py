"""Layer norm over the channel axis of (B, C, 1, S) activations."""
import torch
from torch import nn


class LayerNormANE(nn.Module):
    """Same parameters (`weight`, `bias` of shape (C,)) and result as nn.LayerNorm(C) applied to the
    channel vector of each position; the (B, C, 1, S) layout keeps the Neural Engine's last axis the
    sequence, which it tiles well, instead of the channels."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two-pass mean/variance (not E[x^2] - E[x]^2): in fp16 the latter cancels catastrophically.
        centered = x - x.mean(dim=1, keepdim=True)
        variance = (centered * centered).mean(dim=1, keepdim=True)
        normalized = centered * torch.rsqrt(variance + self.eps)
        return normalized * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
