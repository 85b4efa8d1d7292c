"""What a package may make us allocate while it loads.

Ops whose inputs are all constant (fill, tile or range of constants, constexpr decompression) are
evaluated at load: by coremltools' value inference while it reads the program, then by our plan's
folding. A package of a few bytes can ask for `fill([27000, 27000])` (2.9 GB). The output shape is
known from type inference before anything is computed, so each such op is checked first.
"""
import math
from unittest import mock

import numpy as np

from ...errors import UserError

# SDXL's largest tensor made at load, text_encoder_2's 49408x1280 token embedding, is 241 MiB in fp32
# (what CPU fp16 weights are widened to): 1 GiB leaves 4x room; the 27000x27000 fp32 fill is 2.7 GiB.
MAX_LOAD_TENSOR_BYTES = 1 << 30


def tensor_bytes(sym_type) -> int:
    """Bytes of a MIL tensor type with a known shape; 0 for scalars, lists and symbolic shapes."""
    from coremltools.converters.mil.mil import types

    if not types.is_tensor(sym_type):
        return 0
    shape = sym_type.get_shape()
    if not all(isinstance(d, (int, np.integer)) for d in shape):
        return 0
    itemsize = np.dtype(types.nptype_from_builtin(sym_type.get_primitive())).itemsize
    return math.prod(int(d) for d in shape) * itemsize


def check_load_size(op, sym_types) -> None:
    """A UserError if evaluating `op` at load would make any output over the bound."""
    for sym_type in sym_types:
        size = tensor_bytes(sym_type)
        if size > MAX_LOAD_TENSOR_BYTES:
            raise UserError(f"op {op.name!r} of type {op.op_type!r} would allocate {size / 2**30:.1f} GiB at load "
                            f"(shape {list(sym_type.get_shape())}), over the {MAX_LOAD_TENSOR_BYTES / 2**30:.0f} GiB a "
                            "package may (runtime.mil.bounds.MAX_LOAD_TENSOR_BYTES); the package is damaged or "
                            "crafted: re-convert it")


def _inputs_known(op) -> bool:
    return all(getattr(v, "val", None) is not None for v in op.get_flattened_inputs())


def bounded_value_inference():
    """coremltools' loader with value inference refused for outputs over the bound. Its `_auto_val`
    is patched for the duration of the load (the loader builds ops through it, one at a time); a
    const op's value is already in memory (read from the file), so only computed values are checked."""
    from coremltools.converters.mil.mil.operation import Operation

    original = Operation._auto_val

    def bounded(self, output_types):
        if self.op_type != "const" and _inputs_known(self):
            check_load_size(self, output_types)
        return original(self, output_types)

    return mock.patch.object(Operation, "_auto_val", bounded)
