"""Execute Core ML ML Programs (.mlpackage) with PyTorch, on CPU or CUDA."""
from .model import MILModel, UnsupportedOpError, supported_ops

__all__ = ["MILModel", "UnsupportedOpError", "supported_ops"]
