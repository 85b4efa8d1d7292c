"""Compile-time decompression (constexpr_*) and iOS17 quantize/dequantize.

constexpr ops have constant inputs only, so their builders take no runtime tensors: the plan
evaluates them once at load and keeps the dense weight on the device.
"""
import numpy as np
import torch

from ....lut import lut_iOS16, lut_iOS18, unpack_bits
from .registry import op


def _const(a, value):
    t = a.tensor(value, a.out_mil_dtype())
    return (lambda: t), []


@op("constexpr_lut_to_dense")
def _lut_to_dense(a):
    if a.has("shape"):
        dense = lut_iOS16(a.const("indices"), a.const("lut"), a.const("shape"))
    else:
        dense = lut_iOS18(a.const("indices"), a.const("lut"), a.scalar("vector_axis"))
    return _const(a, dense)


def _along_axis(param, rank, axis):
    param = np.asarray(param)
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return param.reshape(shape)


def affine_dequantize(data, zero_point, scale, axis):
    data = np.asarray(data)
    rank = data.ndim
    axis = axis + rank if axis < 0 else axis
    zp = _along_axis(zero_point, rank, axis).astype(np.float32)
    sc = _along_axis(scale, rank, axis).astype(np.float32)
    return ((data.astype(np.float32) - zp) * sc).astype(np.asarray(scale).dtype)


@op("constexpr_affine_dequantize")
def _affine_dequantize(a):
    dense = affine_dequantize(
        a.const("quantized_data"), a.const("zero_point"), a.const("scale"), int(a.scalar("axis"))
    )
    return _const(a, dense)


def _expand_blocks(param, shape):
    param = np.asarray(param)
    for axis, (n, p) in enumerate(zip(shape, param.shape)):
        if n != p:
            param = np.repeat(param, n // p, axis)
    return param


def blockwise_shift_scale(data, scale, offset=None):
    data = np.asarray(data).astype(np.float32)
    if offset is not None:
        data = data - _expand_blocks(offset, data.shape).astype(np.float32)
    out = data * _expand_blocks(scale, data.shape).astype(np.float32)
    return out.astype(np.asarray(scale).dtype)


@op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a):
    dense = blockwise_shift_scale(a.const("data"), a.const("scale"), a.const("offset"))
    return _const(a, dense)


@op("constexpr_cast")
def _constexpr_cast(a):
    a.covers("output_dtype")
    return _const(a, np.asarray(a.const("source_val")))


def sparse_to_dense(values, mask):
    """iOS18 layout: `mask` has the dense shape; `values` are the nonzero ones in row-major order."""
    mask = np.asarray(mask).astype(bool)
    dense = np.zeros(mask.shape, dtype=np.asarray(values).dtype)
    dense[mask] = np.asarray(values).reshape(-1)
    return dense


@op("constexpr_sparse_to_dense")
def _sparse_to_dense(a):
    values = np.asarray(a.const("nonzero_data"))
    mask = np.asarray(a.const("mask"))
    if a.has("shape"):  # iOS16: flat bit mask, LSB first
        shape = tuple(int(s) for s in a.const("shape"))
        mask = unpack_bits(mask, 1, int(np.prod(shape))).reshape(shape)
    return _const(a, sparse_to_dense(values, mask))


def _sparse_pair(a, mask, dense):
    """The (mask, nonzero values) outputs of the iOS18 joint sparse ops, as load-time constants."""
    mask_t = a.tensor(np.asarray(mask).astype(np.uint8), a.out_mil_dtype(0))
    values_t = a.tensor(dense[np.asarray(mask) != 0].reshape(-1), a.out_mil_dtype(1))
    return (lambda: (mask_t, values_t)), []


@op("constexpr_lut_to_sparse")
def _lut_to_sparse(a):
    """Sparse palettized: the palette indices of the nonzero elements; each index becomes a value
    (or, with vector_axis, a vector of values along that axis, and the mask is widened to match)."""
    mask = np.asarray(a.const("indices_mask"))
    indices = sparse_to_dense(a.const("indices_nonzero_data"), mask)
    axis = a.scalar("vector_axis")
    dense = lut_iOS18(indices, a.const("lut"), axis)
    if axis is not None:
        mask = np.repeat(mask, np.asarray(a.const("lut")).shape[-1], axis=axis)
    return _sparse_pair(a, mask, dense)


@op("constexpr_sparse_blockwise_shift_scale")
def _sparse_blockwise_shift_scale(a):
    """Sparse quantized: the nonzero elements dequantized per block as the dense op does."""
    mask = np.asarray(a.const("data_mask"))
    data = sparse_to_dense(a.const("nonzero_data"), mask)
    return _sparse_pair(a, mask, blockwise_shift_scale(data, a.const("scale"), a.const("offset")))


def _quant_params(a, rank):
    axis = a.scalar("axis")
    axis = None if axis is None else (axis + rank if axis < 0 else axis)

    def view(t):
        if t is None or t.dim() == 0 or axis is None:
            return t
        shape = [1] * rank
        shape[axis] = -1
        return t.reshape(shape)

    return view


@op("dequantize")
def _dequantize(a):
    view = _quant_params(a, len(a.in_shape("input")))
    ins = [a.var("input"), a.var("scale")] + ([a.var("zero_point")] if a.has("zero_point") else [])
    dt = a.out_torch_dtype()

    def fn(x, scale, zp=None):
        x = x.to(torch.float32)
        if zp is not None:
            x = x - view(zp).to(torch.float32)
        return (x * view(scale).to(torch.float32)).to(dt)

    return fn, ins


@op("quantize")
def _quantize(a):
    view = _quant_params(a, len(a.in_shape("input")))
    ins = [a.var("input"), a.var("scale")] + ([a.var("zero_point")] if a.has("zero_point") else [])
    a.covers("output_dtype")
    dt = a.out_torch_dtype()
    info = torch.iinfo(dt)

    def fn(x, scale, zp=None):
        q = x.to(torch.float32) / view(scale).to(torch.float32)
        q = torch.round(q)  # half to even, as MIL's round
        if zp is not None:
            q = q + view(zp).to(torch.float32)
        return torch.clamp(q, info.min, info.max).to(dt)

    return fn, ins
