"""MIL element types -> torch storage dtypes.

On CPU, fp16 tensors are stored as float32 holding fp16-representable values: CPU kernels for
half precision are slow or missing in PyTorch, so each fp16 op computes in fp32 and its result is
rounded to fp16 (see `plan.py`). On CUDA fp16 is stored and computed as torch.float16.
"""
import numpy as np
import torch
from coremltools.converters.mil.mil import types

_BY_NAME = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "int16": torch.int16,
    "uint16": torch.int32,  # torch lacks full uint16 support; int32 holds every value
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# Sub-byte types (constexpr masks, palette indices, int4 data) exist only as load-time constants
# between constexpr ops; one byte holds each element.
_BY_NAME.update({f"uint{n}": torch.uint8 for n in (1, 2, 3, 4, 6)})
_BY_NAME["int4"] = torch.int8

_NUMPY = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int32": np.int32,
    "int64": np.int64,
    "int16": np.int16,
    "uint16": np.uint16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
_NUMPY.update({f"uint{n}": np.uint8 for n in (1, 2, 3, 4, 6)})
_NUMPY["int4"] = np.int8


def mil_name(dtype) -> str:
    """'fp16', 'int32', ... for a MIL builtin type."""
    return types.builtin_to_string(dtype)


def storage_dtype(mil_type_name: str, device: torch.device) -> torch.dtype:
    if mil_type_name not in _BY_NAME:
        raise TypeError(f"MIL dtype {mil_type_name} cannot be held in a runtime tensor")
    if mil_type_name == "fp16" and device.type == "cpu":
        return torch.float32
    return _BY_NAME[mil_type_name]


def numpy_dtype(mil_type_name: str):
    return _NUMPY[mil_type_name]


def is_float(mil_type_name: str) -> bool:
    return mil_type_name in ("fp16", "fp32", "fp64")
