"""python_coreml_sd: Stable Diffusion to Core ML, verified on any machine."""
from ._version import __version__

__all__ = ["__version__"]
