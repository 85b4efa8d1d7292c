"""Execute Core ML ML Programs (.mlpackage) with PyTorch, on CPU or CUDA."""
from .model import MILModel, MILState, UnsupportedOpError, supported_ops
from .shapes import AllowedShapes

__all__ = ["AllowedShapes", "MILModel", "MILState", "UnsupportedOpError", "supported_ops"]
