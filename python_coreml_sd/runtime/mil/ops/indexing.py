"""Scatter, slice update, one-hot and sequence reversal: ops that write into or build index maps.

Every scatter is reduced to one kernel, `scatter_rows`: rows of `updates` combined into rows of
`data` at `idx`, in index order, as the MIL reference specifies (repeated indices: the last update
wins; add/mul/... accumulate). Index tensors stay on the device (no host round trips).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from ....errors import UserError
from .registry import op
from .tensor import _index_plan, _indexer, _runtime, _slice_args, _wrap

_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


def scatter_rows(data, idx, updates, mode):
    """data (N, ...) with updates (M, ...) combined into its rows idx (M,), in order."""
    out = data.clone()
    if mode == "update":
        # Keep each index's last occurrence only: index_copy_ of duplicates has no defined order.
        order = torch.arange(idx.numel(), device=idx.device)
        last = torch.full((data.shape[0],), -1, dtype=order.dtype, device=idx.device)
        last = last.scatter_reduce(0, idx, order, "amax")
        keep = last[idx] == order
        return out.index_copy_(0, idx[keep], updates[keep])
    if mode in ("add", "sub"):
        return out.index_add_(0, idx, updates if mode == "add" else -updates)
    rows = idx.reshape((-1,) + (1,) * (updates.dim() - 1)).expand_as(updates)
    if mode == "div":  # data / u1 / u2 ... = data / (u1 * u2 ...)
        return out / torch.ones_like(out).scatter_reduce_(0, rows, updates, "prod")
    if mode in _REDUCE:
        return out.scatter_reduce_(0, rows, updates, _REDUCE[mode])
    raise ValueError(f"scatter mode {mode!r} is not in the MIL op reference")


def _bounds_check(a):
    """check(indices, sizes): with validate_indices=True (iOS17 scatter ops) an index outside
    [0, size) is a run-time error, as Core ML raises one; otherwise nothing (negatives wrap)."""
    if not a.scalar("validate_indices", False):
        return lambda indices, sizes: None

    def check(indices, sizes):
        if bool(((indices < 0) | (indices >= sizes)).any()):
            raise UserError(f"op {a.name!r} of type {a.type!r}: an index is out of bounds and the "
                            "program sets validate_indices")

    return check


def _mode(a):
    mode = str(a.scalar("mode", "add"))
    if mode == "div" and a.out_mil_dtype() == "int32":
        raise ValueError("integer scatter mode 'div': its rounding is not specified")
    return mode


@op("scatter")
def _scatter(a):
    # Rows along `axis`: move it first, scatter whole slices, move it back.
    mode, check = _mode(a), _bounds_check(a)
    rank = len(a.in_shape("data"))
    axis = int(a.scalar("axis", 0)) % rank
    size = a.in_shape("data")[axis]

    def fn(data, indices, updates):
        check(indices, size)
        d, u = data.movedim(axis, 0), updates.movedim(axis, 0)
        return scatter_rows(d, _wrap(indices, size).reshape(-1), u, mode).movedim(0, axis)

    return fn, [a.var("data"), a.var("indices"), a.var("updates")]


@op("scatter_along_axis")
def _scatter_along_axis(a):
    # Element-wise: each update goes to its own position with the `axis` coordinate replaced by its
    # index, i.e. a scatter of single elements into the flattened data at precomputed flat offsets.
    mode, check = _mode(a), _bounds_check(a)
    shape = a.in_shape("data")
    k_shape = a.in_shape("indices")
    axis = int(a.scalar("axis", 0)) % len(shape)
    strides = np.cumprod((shape[1:] + (1,))[::-1])[::-1]
    grid = np.indices(k_shape)
    grid[axis] = 0
    base = torch.as_tensor(sum(g * s for g, s in zip(grid, strides)).reshape(-1), device=a.device)
    stride, size = int(strides[axis]), shape[axis]

    def fn(data, indices, updates):
        check(indices, size)
        flat = base + _wrap(indices, size).reshape(-1) * stride
        return scatter_rows(data.reshape(-1), flat, updates.reshape(-1), mode).reshape(data.shape)

    return fn, [a.var("data"), a.var("indices"), a.var("updates")]


@op("scatter_nd")
def _scatter_nd(a):
    # updates written at `indices` (..., k) over the first k axes of data: rows of data flattened over
    # those axes (Apple's safety checker zeroes flagged images with it).
    mode, check = _mode(a), _bounds_check(a)
    shape = a.in_shape("data")

    def fn(data, indices, updates):
        k = indices.shape[-1]
        dims = torch.tensor(shape[:k], device=indices.device)
        check(indices, dims)
        idx = torch.where(indices.long() < 0, indices.long() + dims, indices.long()).reshape(-1, k)
        strides = torch.tensor([math.prod(shape[i + 1:k]) for i in range(k)], device=idx.device)
        rows = data.reshape((-1,) + tuple(shape[k:]))
        values = updates.reshape((idx.shape[0],) + tuple(shape[k:]))
        return scatter_rows(rows, (idx * strides).sum(-1), values, mode).reshape(shape)

    return fn, [a.var("data"), a.var("indices"), a.var("updates")]


@op("slice_update")
def _slice_update(a):
    # The slice of a flat-position map, taken with slice_by_index's own plan, names the positions
    # `update` fills (with squeezes and negative strides for free).
    shape, stride, masks = _slice_args(a)
    dev = a.device

    def positions(begin, end, x_shape):
        where = torch.arange(math.prod(x_shape), device=dev).reshape(x_shape)
        return _indexer(_index_plan(x_shape, begin, end, stride, *masks), dev)(where).reshape(-1)

    def write(x, pos, update):
        out = x.reshape(-1).clone()
        out[pos] = update.reshape(-1).to(out.dtype)
        return out.reshape(x.shape)

    if _runtime(a, "begin", "end"):
        def fn(x, update, begin, end):
            return write(x, positions(begin.tolist(), end.tolist(), tuple(x.shape)), update)

        return fn, [a.var("x"), a.var("update"), a.var("begin"), a.var("end")]
    pos = positions(a.ints("begin"), a.ints("end"), shape)
    return (lambda x, update: write(x, pos, update)), [a.var("x"), a.var("update")]


@op("one_hot")
def _one_hot(a):
    rank = len(a.in_shape("indices"))
    axis = int(a.scalar("axis", -1))
    axis = axis + rank + 1 if axis < 0 else axis
    on, off = a.scalar("on_value", 1), a.scalar("off_value", 0)
    dt = a.out_torch_dtype()

    def fn(indices, depth):
        n = int(depth.reshape(-1)[0])
        # Out-of-range indices (negative included) give an all-off vector, as in TensorFlow.
        hot = indices.long().unsqueeze(-1) == torch.arange(n, device=indices.device)
        out = torch.where(hot, torch.tensor(on, dtype=dt, device=hot.device),
                          torch.tensor(off, dtype=dt, device=hot.device))
        return out.movedim(-1, axis)

    return fn, [a.var("indices"), a.var("one_hot_vector_size")]


@op("reverse_sequence")
def _reverse_sequence(a):
    # Source position along seq_axis: lengths[b] - 1 - t for t < lengths[b], else t itself.
    shape = a.in_shape()
    rank = len(shape)
    seq = int(a.scalar("seq_axis", 0)) % rank
    batch = int(a.scalar("batch_axis", 0)) % rank
    view_t = [1] * rank
    view_t[seq] = -1
    view_b = [1] * rank
    view_b[batch] = -1
    t = torch.arange(shape[seq], device=a.device).reshape(view_t)

    def fn(x, lengths):
        n = lengths.long().reshape(view_b)
        src = torch.where(t < n, n - 1 - t, t)
        return torch.gather(x, seq, src.expand(x.shape))

    return fn, [a.var("x"), a.var("lengths")]


@op("local_response_norm")
def _local_response_norm(a):
    # The window runs over axis -3 (C of [..., C, H, W]), not axis 1: coremltools' smoke test expects,
    # for a (1, 3, 2) input, each element normalised by itself alone (C = 1). For rank 4 the two agree.
    # Within the window it is PyTorch's LRN (coremltools' stress reference): size // 2 channels
    # before, (size - 1) // 2 after, alpha divided by size.
    size = int(a.scalar("size"))
    alpha, beta, k = a.scalar("alpha", 1e-4), a.scalar("beta", 0.75), a.scalar("k", 1.0)
    shape = a.in_shape()
    lead = (-1,) + tuple(shape[-3:])
    return (lambda x: F.local_response_norm(x.reshape(lead), size, alpha, beta, k).reshape(shape)), [a.var("x")]
