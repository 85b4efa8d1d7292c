"""Image generation from converted models (Core ML, MIL runtime) or the original PyTorch modules."""
