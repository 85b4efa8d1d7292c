"""Importing the op modules fills `registry.BUILDERS`."""
from . import compression, control_flow, distributions, elementwise, indexing, nn, recurrent, sampling, states, tensor  # noqa: F401
from .registry import BUILDERS, NotConstant, OpArgs

__all__ = ["BUILDERS", "NotConstant", "OpArgs"]
