"""Neural-Engine-friendly PyTorch layers: activations in the (B, C, 1, S) layout, 1x1 convolutions in
place of linear layers, channel-axis layer norm, and attention variants the Neural Engine runs well."""
from .attention import ATTENTION_IMPLEMENTATIONS, CrossAttention
from .layer_norm import LayerNormANE

__all__ = ["ATTENTION_IMPLEMENTATIONS", "CrossAttention", "LayerNormANE"]
