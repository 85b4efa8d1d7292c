"""Shape, indexing, concatenation, padding, gather and resampling ops."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from .registry import NotConstant, norm_axes, op, static


def _to_declared_shape(a):
    a.covers("shape", "axes", "axis", "ref_tensors", "begins", "ends", "end_masks")  # all of them determine the declared output shape
    shape = a.out_shape
    if not static(shape):
        raise ValueError(f"{a.type} {a.name!r}: output shape {shape} is not static")
    return (lambda x: x.reshape(shape)), [a.var("x")]


@op("reshape", "expand_dims", "squeeze", "flatten2d", "reshape_like")
def _reshape(a):
    return _to_declared_shape(a)


@op("transpose")
def _transpose(a):
    perm = a.ints("perm")
    return (lambda x: x.permute(perm)), [a.var("x")]


def _axis_slice(begin, end, stride, size):
    """Python slice or index list for one axis (torch has no negative strides)."""
    if stride > 0:
        return slice(begin, end, stride)
    idx = list(range(size))[slice(begin, end, stride)]
    return idx


def _runtime(a, *names):
    """True when one of `names` is computed at run time (a shape's entries, a non_zero count)."""
    try:
        for n in names:
            a.const(n)
    except NotConstant:
        return True
    return False


def _index_plan(shape, begin, end, stride, bmask, emask, smask):
    plan = []
    for i in range(len(shape)):
        if smask[i]:
            plan.append(begin[i])
            continue
        b = None if bmask[i] else begin[i]
        e = None if emask[i] else end[i]
        plan.append(_axis_slice(b, e, stride[i], shape[i]))
    return plan


def _slice_args(a):
    """(x shape, stride, [begin_mask, end_mask, squeeze_mask]) of a slice_by_index-style op."""
    shape = a.in_shape()
    rank = len(shape)
    masks = [a.ints(m, [0] * rank) for m in ("begin_mask", "end_mask", "squeeze_mask")]
    return shape, a.ints("stride", [1] * rank), masks


@op("slice_by_index")
def _slice_by_index(a):
    shape, stride, masks = _slice_args(a)
    if _runtime(a, "begin", "end"):
        # Bounds known only at run time: the plan is made per call, on the host (one sync each).
        def fn(x, begin, end):
            plan = _index_plan(x.shape, begin.tolist(), end.tolist(), stride, *masks)
            return _indexer(plan, x.device)(x)

        return fn, [a.var("x"), a.var("begin"), a.var("end")]
    plan = _index_plan(shape, a.ints("begin"), a.ints("end"), stride, *masks)
    return _indexer(plan, a.device), [a.var("x")]


def _indexer(plan, device):
    # Index tensors live on the device from the start: no host copies while running (or capturing).
    lists = [(ax, torch.tensor(p, device=device, dtype=torch.long)) for ax, p in enumerate(plan) if isinstance(p, list)]
    basic = tuple(slice(None) if isinstance(p, list) else p for p in plan)
    if not lists:
        return lambda x: x[basic]

    def fn(x):
        # Index lists first, while every axis is still where `plan` says.
        for ax, idx in lists:
            x = x.index_select(ax, idx)
        return x[basic]

    return fn


def _size_plan(shape, begin, size):
    plan = []
    for b, n, dim in zip(begin, size, shape):
        b = b + dim if b < 0 else b
        plan.append(slice(b, None if n == -1 else b + n))
    return tuple(plan)


@op("slice_by_size")
def _slice_by_size(a):
    if _runtime(a, "begin", "size"):
        def fn(x, begin, size):
            return x[_size_plan(x.shape, begin.tolist(), size.tolist())]

        return fn, [a.var("x"), a.var("begin"), a.var("size")]
    basic = _size_plan(a.in_shape(), a.ints("begin"), a.ints("size"))
    return (lambda x: x[basic]), [a.var("x")]


@op("concat")
def _concat(a):
    axis = int(a.scalar("axis"))
    values = list(a.var("values"))
    if any(len(v.shape) == 0 for v in values):  # scalars (a run-time shape's entries) join as length 1
        a.covers("interleave")  # one value per input: interleaving changes nothing
        return (lambda *xs: torch.cat([x.reshape(-1) for x in xs], axis)), values
    if not a.scalar("interleave", False):
        return (lambda *xs: torch.cat(xs, axis)), values
    out_shape = a.out_shape
    axis %= len(out_shape)
    return (lambda *xs: torch.stack(xs, axis + 1).reshape(out_shape)), values


@op("split")
def _split(a):
    axis = int(a.scalar("axis")) % len(a.in_shape())
    a.covers("num_splits", "split_sizes")  # both are reflected in the declared output shapes
    sizes = [s[axis] for s in a.out_shapes()]
    return (lambda x: torch.split(x, sizes, axis)), [a.var("x")]


@op("stack")
def _stack(a):
    axis = int(a.scalar("axis"))
    return (lambda *xs: torch.stack(xs, axis)), list(a.var("values"))


@op("tile")
def _tile(a):
    if a.var("reps").val is None:  # reps from a run-time shape (after non_zero, in Apple's safety checker)
        return (lambda x, reps: x.repeat([int(r) for r in reps.tolist()])), [a.var("x"), a.var("reps")]
    reps = a.ints("reps")
    return (lambda x: x.repeat(reps)), [a.var("x")]


@op("reverse")
def _reverse(a):
    rank = len(a.in_shape())
    axes = a.ints("axes")
    axes = list(range(rank)) if axes is None else norm_axes(axes, rank)
    return (lambda x: torch.flip(x, axes)), [a.var("x")]


@op("pad")
def _pad(a):
    pads = a.ints("pad")
    mode = a.const("mode", "constant")
    value = a.scalar("constant_val", 0.0)
    rank = len(a.in_shape())
    n = len(pads) // 2
    tp = []
    for i in reversed(range(n)):
        tp += [pads[2 * i], pads[2 * i + 1]]
    if mode == "constant":
        return (lambda x: F.pad(x, tp, value=value)), [a.var("x")]
    tmode = {"reflect": "reflect", "replicate": "replicate"}.get(mode)
    if tmode is None:
        raise ValueError(f"pad mode {mode!r} is not in the MIL op reference")
    # torch pads non-constant modes only on trailing axes after (N, C); drop zero leading pads.
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
        tp = tp[:-2]
    lead = rank - len(tp) // 2

    def fn(x):
        shape = x.shape
        y = x.reshape((1, -1) + tuple(shape[lead:]))
        y = F.pad(y, tp, mode=tmode)
        return y.reshape(tuple(shape[:lead]) + tuple(y.shape[2:]))

    return fn, [a.var("x")]


def _wrap(idx, size):
    idx = idx.long()
    return torch.where(idx < 0, idx + size, idx)


@op("gather")
def _gather(a):
    x_shape = a.in_shape()
    axis = int(a.scalar("axis", 0))
    axis = axis + len(x_shape) if axis < 0 else axis
    batch_dims = int(a.scalar("batch_dims", 0))
    a.covers("validate_indices")  # a check on valid programs; results do not depend on it
    size = x_shape[axis]
    out_shape = a.out_shape

    def flat(x, idx):
        idx = _wrap(idx, size)
        return x.index_select(axis, idx.reshape(-1)).reshape(out_shape)

    if batch_dims == 0:
        return flat, [a.var("x"), a.var("indices")]

    def batched(x, idx):
        idx = _wrap(idx, size)
        xb = x.reshape((-1,) + tuple(x.shape[batch_dims:]))
        ib = idx.reshape((-1,) + tuple(idx.shape[batch_dims:]))
        ax = axis - batch_dims
        parts = [
            xb[i].index_select(ax, ib[i].reshape(-1)).reshape(
                tuple(xb.shape[1 : ax + 1]) + tuple(ib.shape[1:]) + tuple(xb.shape[ax + 2 :])
            )
            for i in range(xb.shape[0])
        ]
        return torch.stack(parts).reshape(out_shape)

    return batched, [a.var("x"), a.var("indices")]


@op("gather_along_axis")
def _gather_along_axis(a):
    axis = int(a.scalar("axis", 0)) % len(a.in_shape())
    size = a.in_shape()[axis]
    a.covers("validate_indices")
    return (lambda x, idx: torch.gather(x, axis, _wrap(idx, size))), [a.var("x"), a.var("indices")]


@op("gather_nd")
def _gather_nd(a):
    batch_dims = int(a.scalar("batch_dims", 0))
    a.covers("validate_indices")
    x_shape = a.in_shape()
    nb = math.prod(x_shape[:batch_dims])

    def fn(x, idx):
        # iOS16 batch_dims: the leading batch axes of x and indices pair up; flatten them into one
        # and index it with each row's batch number, then the indices' own k columns.
        idx = idx.long()
        k = idx.shape[-1]
        xb = x.reshape((nb,) + tuple(x.shape[batch_dims:]))
        ib = idx.reshape(nb, -1, k)
        rows = torch.arange(nb, device=x.device).reshape(-1, 1)
        cols = tuple(_wrap(ib[..., i], x_shape[batch_dims + i]) for i in range(k))
        return xb[(rows,) + cols].reshape(tuple(idx.shape[:-1]) + tuple(x.shape[batch_dims + k:]))

    return fn, [a.var("x"), a.var("indices")]


@op("shape")
def _shape(a):
    return (lambda x: torch.tensor(tuple(x.shape), dtype=torch.int32, device=x.device)), [a.var("x")]


@op("fill")
def _fill(a):
    value, dt, dev = a.scalar("value", 0.0), a.out_torch_dtype(), a.device
    if _runtime(a, "shape"):  # the shape's entries (or its length) known at run time only
        return (lambda s: torch.full(tuple(s.tolist()), value, dtype=dt, device=s.device)), [a.var("shape")]
    shape = tuple(a.ints("shape"))
    return (lambda: torch.full(shape, value, dtype=dt, device=dev)), []


@op("fill_like")
def _fill_like(a):
    value = a.scalar("value", 0.0)
    dt = a.out_torch_dtype()
    return (lambda x: torch.full(x.shape, value, dtype=dt, device=x.device)), [a.var("ref_tensor")]


@op("range_1d")
def _range_1d(a):
    def fn(end, start, step):
        return torch.arange(start.item(), end.item(), step.item(), device=end.device)

    return fn, [a.var("end"), a.var("start"), a.var("step")]


@op("band_part")
def _band_part(a):
    lower, upper = int(a.scalar("lower", -1)), int(a.scalar("upper", -1))

    def fn(x):
        rows, cols = x.shape[-2], x.shape[-1]
        i = torch.arange(rows, device=x.device).reshape(-1, 1)
        j = torch.arange(cols, device=x.device).reshape(1, -1)
        keep = torch.ones(rows, cols, dtype=torch.bool, device=x.device)
        if lower >= 0:
            keep &= (i - j) <= lower
        if upper >= 0:
            keep &= (j - i) <= upper
        return torch.where(keep, x, torch.zeros_like(x))

    return fn, [a.var("x")]


@op("cumsum")
def _cumsum(a):
    axis = int(a.scalar("axis", 0))
    exclusive = bool(a.scalar("exclusive", False))
    reverse = bool(a.scalar("reverse", False))

    def fn(x):
        y = torch.flip(x, [axis]) if reverse else x
        out = torch.cumsum(y, axis)
        if exclusive:
            out = out - y
        return torch.flip(out, [axis]) if reverse else out

    return fn, [a.var("x")]


@op("pixel_shuffle")
def _pixel_shuffle(a):
    r = int(a.scalar("upscale_factor"))
    return (lambda x: F.pixel_shuffle(x, r)), [a.var("x")]


@op("pixel_unshuffle")
def _pixel_unshuffle(a):
    r = int(a.scalar("downscale_factor"))
    return (lambda x: F.pixel_unshuffle(x, r)), [a.var("x")]


# depth_to_space / space_to_depth use TensorFlow's DCR channel order (Core ML's DEPTH_TO_SPACE
# mode): channel (i * r + j) * C' + c holds output pixel (c, h * r + i, w * r + j). pixel_shuffle is
# PyTorch's CRD order: channel c * r * r + i * r + j.
@op("depth_to_space")
def _depth_to_space(a):
    r = int(a.scalar("block_size"))
    n, c, h, w = a.in_shape()
    out = (n, c // (r * r), h * r, w * r)
    return (lambda x: x.reshape(n, r, r, c // (r * r), h, w).permute(0, 3, 4, 1, 5, 2).reshape(out)), [a.var("x")]


@op("space_to_depth")
def _space_to_depth(a):
    r = int(a.scalar("block_size"))
    n, c, h, w = a.in_shape()
    out = (n, c * r * r, h // r, w // r)
    return (lambda x: x.reshape(n, c, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4).reshape(out)), [a.var("x")]


@op("non_zero")
def _non_zero(a):
    # (N, rank) int32 indices of the non-zero elements, N known only at run time (Apple's safety
    # checker zeroes flagged images through it); row-major order, as Core ML returns them.
    return (lambda x: torch.nonzero(x).to(torch.int32)), [a.var("x")]


@op("argsort")
def _argsort(a):
    axis = int(a.scalar("axis", -1))
    asc = bool(a.scalar("ascending", False))
    return (lambda x: torch.argsort(x, dim=axis, descending=not asc, stable=True)), [a.var("x")]


@op("topk")
def _topk(a):
    k = int(a.scalar("k", 1))
    axis = int(a.scalar("axis", -1))
    asc = bool(a.scalar("ascending", False))
    a.covers("sort", "output_indices_dtype")  # sorted output is a valid answer either way
    if not a.scalar("return_indices", True):
        return (lambda x: torch.topk(x, k, axis, largest=not asc, sorted=True)[0]), [a.var("x")]
    return (lambda x: torch.topk(x, k, axis, largest=not asc, sorted=True)), [a.var("x")]


@op("crop")
def _crop(a):
    ch, cw = a.ints("crop_height"), a.ints("crop_width")
    h, w = a.in_shape()[-2:]
    idx = (Ellipsis, slice(ch[0], h - ch[1]), slice(cw[0], w - cw[1]))
    return (lambda x: x[idx]), [a.var("x")]


def _nearest_index(in_size, out_size):
    # Core ML samples at the input/output size ratio, not 1/scale: a fractional scale's output size
    # is floored, and coremltools' fractional-scale tests (3 -> 3 at scale 1.12) expect the ratio.
    return np.minimum(np.floor(np.arange(out_size) * in_size / out_size), in_size - 1).astype(np.int64)


def _nearest(a):
    in_hw = a.in_shape()[-2:]
    out_hw = a.out_shape[-2:]
    if all(o % i == 0 for i, o in zip(in_hw, out_hw)):
        sh, sw = out_hw[0] // in_hw[0], out_hw[1] // in_hw[1]
        return (lambda x: x.repeat_interleave(sh, -2).repeat_interleave(sw, -1)), [a.var("x")]
    ih = torch.from_numpy(_nearest_index(in_hw[0], out_hw[0])).to(a.device)
    iw = torch.from_numpy(_nearest_index(in_hw[1], out_hw[1])).to(a.device)
    return (lambda x: x.index_select(-2, ih).index_select(-1, iw)), [a.var("x")]


@op("upsample_nearest_neighbor")
def _upsample_nearest(a):
    a.covers("scale_factor_height", "scale_factor_width")  # reflected in the declared output shape
    return _nearest(a)


@op("resize_nearest_neighbor")
def _resize_nearest(a):
    a.covers("target_size_height", "target_size_width")  # the declared output shape
    return _nearest(a)


def _grid(mode, xin, xout):
    """Sample positions along one axis, as the MIL reference defines each sampling mode."""
    i = np.arange(xout, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if xout == 1:
            g = np.array([(xin - 1) / 2.0 if mode == "ALIGN_CORNERS" else 0.0])
        else:
            g = i * (xin - 1) / (xout - 1)
    elif mode == "DEFAULT":
        g = i * (xin - xin / xout) / (xout - 1) if xout > 1 else np.zeros(1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, xin - 1) / xout
        g = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        s = xin / xout
        g = i * s + 0.5 * s - 0.5
    elif mode == "ASYMMETRIC":
        g = i * (xin / xout)
    else:
        raise ValueError(f"sampling mode {mode!r} is not in the MIL op reference")
    return np.clip(g, 0, xin - 1)


def _lerp_weights(grid, size, rank, axis, device):
    """Device tensors (lo, hi, frac) for linear interpolation at `grid` along `axis`."""
    lo = np.floor(grid).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    shape = [1] * rank
    shape[axis] = -1
    frac = torch.from_numpy((grid - lo).astype(np.float32)).reshape(shape).to(device)
    return torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device), frac


def _lerp_axis(x, axis, lo, hi, frac):
    a = x.index_select(axis, lo)
    b = x.index_select(axis, hi)
    return a + (b - a) * frac.to(x.dtype)


def _bilinear(a, grid_h, grid_w):
    shape = a.in_shape()
    rank = len(shape)
    wh = _lerp_weights(grid_h, shape[-2], rank, rank - 2, a.device)
    ww = _lerp_weights(grid_w, shape[-1], rank, rank - 1, a.device)

    def fn(x):
        return _lerp_axis(_lerp_axis(x, rank - 2, *wh), rank - 1, *ww)

    return fn, [a.var("x")]


@op("upsample_bilinear")
def _upsample_bilinear(a):
    align = bool(a.scalar("align_corners", True))
    half = bool(a.scalar("half_pixel_centers", not align))
    # Scales only set the (floored) output size; sampling uses the size ratio, as coremltools'
    # fractional-scale test expects ([0, 1] at 2.6 -> [0, .1, .5, .9, 1]).
    a.covers("scale_factor_height", "scale_factor_width")
    mode = "ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half else "ASYMMETRIC")
    grids = [_grid(mode, i, o) for i, o in zip(a.in_shape()[-2:], a.out_shape[-2:])]
    return _bilinear(a, *grids)


@op("resize_bilinear")
def _resize_bilinear(a):
    mode = a.const("sampling_mode", "DEFAULT")
    a.covers("target_size_height", "target_size_width")
    grids = [_grid(mode, i, o) for i, o in zip(a.in_shape()[-2:], a.out_shape[-2:])]
    return _bilinear(a, *grids)




@op("sliding_windows")
def _sliding_windows(a):
    # Window i holds x[..., i * stride : i * stride + size, ...]; its `size` axis follows `axis`.
    rank = len(a.in_shape())
    axis = int(a.scalar("axis")) % rank
    size, stride = int(a.scalar("size")), int(a.scalar("stride", 1))
    return (lambda x: x.unfold(axis, size, stride).movedim(-1, axis + 1)), [a.var("x")]


# space_to_batch / batch_to_space are TensorFlow's, in NCHW: output batch b * N + n holds block
# position b = (i, j) of image n (coremltools' expected values: block-major, image-minor).
@op("space_to_batch")
def _space_to_batch(a):
    bh, bw = a.ints("block_shape")
    (t, b), (l, r) = np.asarray(a.const("paddings")).reshape(2, 2).tolist()
    n, c, h, w = a.in_shape()
    hh, ww = (h + t + b) // bh, (w + l + r) // bw

    def fn(x):
        y = F.pad(x, (l, r, t, b)).reshape(n, c, hh, bh, ww, bw)
        return y.permute(3, 5, 0, 1, 2, 4).reshape(bh * bw * n, c, hh, ww)

    return fn, [a.var("x")]


@op("batch_to_space")
def _batch_to_space(a):
    bh, bw = a.ints("block_shape")
    (t, b), (l, r) = np.asarray(a.const("crops")).reshape(2, 2).tolist()
    nb, c, h, w = a.in_shape()
    n = nb // (bh * bw)

    def fn(x):
        y = x.reshape(bh, bw, n, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
        return y[:, :, t:h * bh - b, l:w * bw - r]

    return fn, [a.var("x")]


def _resize_nearest_index(xin, xout):
    # Unlike resize_nearest_neighbor, coremltools expects 2 -> 3 to give rows [0, 1, 1] (not
    # [0, 0, 1]). Both floor((i + 0.5) * in / out) and round(i * in / out) give that; where they part
    # we cannot tell which Core ML computes, so those sizes are refused rather than guessed.
    i = np.arange(xout)
    half = np.minimum(np.floor((i + 0.5) * xin / xout), xin - 1).astype(np.int64)
    rounded = np.minimum(np.floor(i * xin / xout + 0.5), xin - 1).astype(np.int64)
    if not np.array_equal(half, rounded):
        raise ValueError(f"NEAREST_NEIGHBOR resize {xin} -> {xout}: Core ML's sample positions for these "
                         "sizes are not established")
    return half


def _resize_plan(in_shape, shape, dims, interp, mode, device):
    """Per resized axis: (axis, index tensor) for nearest, (axis, lo, hi, frac) for linear."""
    rank = len(in_shape)
    plan = []
    for i in range(dims):
        axis = rank - dims + i
        xin, xout = int(in_shape[axis]), int(shape[len(shape) - dims + i]) or int(in_shape[axis])  # 0: keep
        if xin == xout:
            continue
        if interp == "NEAREST_NEIGHBOR":
            plan.append((axis, torch.from_numpy(_resize_nearest_index(xin, xout)).to(device)))
        else:
            plan.append((axis,) + _lerp_weights(_grid(mode, xin, xout), xin, rank, axis, device))
    return plan


def _apply_resize(x, plan):
    for axis, *w in plan:
        x = x.index_select(axis, w[0]) if len(w) == 1 else _lerp_axis(x, axis, *w)
    return x


@op("resize")
def _resize(a):
    # iOS17: the last `resized_dims` axes take their sizes from `shape` (0 keeps x's), maybe known only
    # at run time. LINEAR samples like resize_bilinear's modes; NEAREST_NEIGHBOR like
    # resize_nearest_neighbor, whose only documented sampling is the size ratio (DEFAULT).
    dims = int(a.scalar("resized_dims"))
    interp = str(a.scalar("interpolation_mode", "LINEAR"))
    mode = str(a.scalar("sampling_mode", "DEFAULT"))
    if interp == "NEAREST_NEIGHBOR" and mode != "DEFAULT":
        raise ValueError(f"NEAREST_NEIGHBOR with sampling_mode {mode!r}: its sample positions are not specified")
    if interp not in ("LINEAR", "NEAREST_NEIGHBOR"):
        raise ValueError(f"interpolation_mode {interp!r} is not in the MIL op reference")
    if _runtime(a, "shape") or not static(a.in_shape()):
        dev = a.device

        def fn(x, shape):
            return _apply_resize(x, _resize_plan(tuple(x.shape), shape.tolist(), dims, interp, mode, dev))

        return fn, [a.var("x"), a.var("shape")]
    plan = _resize_plan(a.in_shape(), a.ints("shape"), dims, interp, mode, a.device)
    return (lambda x: _apply_resize(x, plan)), [a.var("x")]
