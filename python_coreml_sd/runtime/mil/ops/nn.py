"""Linear algebra, convolution, pooling, normalization, reductions, attention."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..dtypes import mil_name, storage_dtype
from . import onednn
from .registry import Derived, is_weight, norm_axes, op, static


def _compute_dtype(a, names):
    """The dtype a linear/matmul computes in. iOS17 lets a const operand's dtype differ from the
    other's (int32 x with fp weights, ...); the output takes the non-const operand's dtype. Integer
    products are computed in float64 (exact below 2**53; CUDA has no int matmul) and cast back,
    which is exact only for integer operands, so a non-integer const feeding an integer output is
    refused rather than rounded in a way Core ML may not."""
    mil = {a.var(n).dtype for n in names if a.has(n)}
    out = a.out_mil_dtype()
    if out in ("fp16", "fp32") and len(mil) == 1:
        return None  # one dtype throughout: no casts
    if out in ("fp16", "fp32"):
        return a.out_torch_dtype()
    for n in names:
        v = a.var(n)
        if v is not None and v.val is not None and not np.all(np.mod(np.asarray(v.val, np.float64), 1) == 0):
            raise ValueError(f"non-integer {n} for an integer ({out}) output: rounding is not specified")
    return torch.float64


def _cast_all(dt, xs):
    return xs if dt is None else [x if x is None else x.to(dt) for x in xs]


def can_prepack(device, x, weight, others=()):
    """oneDNN prepacking (onednn.py) applies on `device`: available, the CPU, a constant weight, a known
    input shape, and fp32 storage for x, the weight and `others` (bias, result)."""
    device = torch.device(device)
    if not (onednn.AVAILABLE and device.type == "cpu" and is_weight(weight) and static(x.shape)):
        return False
    return all(storage_dtype(mil_name(v.dtype), device) == torch.float32 for v in (x, weight, *others))


def _prepackable(a):
    others = [a.var("bias")] if a.has("bias") else []
    return a.prepack and can_prepack(a.device, a.var("x"), a.var("weight"), others + list(a.op.outputs))


def gemm_rows(shape, channel_axis):
    """Rows of the GEMM a linear (channels last) or 1x1 convolution (channels at axis 1) makes of `shape`."""
    return int(np.prod(shape)) // int(shape[channel_axis])


def packed_linear_weight(w, rows):
    """The Derived constant of a linear's (or a 1x1 convolution's) weight laid out for oneDNN."""
    return Derived(lambda t: onednn.pack_linear(t.reshape(t.shape[0], t.shape[1]), rows), [w], ("linear", rows))


def packed_pointwise_conv(x, packed, b=None):
    """pointwise_conv on a packed_linear_weight."""
    return onednn.linear(x.movedim(1, -1), packed, b).movedim(-1, 1)


@op("linear")
def _linear(a):
    dt = _compute_dtype(a, ("x", "weight", "bias"))
    bias = [a.var("bias")] if a.has("bias") else []
    if dt is None and _prepackable(a):
        return onednn.linear, [a.var("x"), packed_linear_weight(a.var("weight"), gemm_rows(a.in_shape(), -1))] + bias
    return (lambda x, w, b=None: F.linear(*_cast_all(dt, [x, w, b]))), [a.var("x"), a.var("weight")] + bias


@op("matmul")
def _matmul(a):
    tx, ty = bool(a.scalar("transpose_x", False)), bool(a.scalar("transpose_y", False))
    dt = _compute_dtype(a, ("x", "y"))

    def fn(x, y):
        x, y = _cast_all(dt, [x, y])
        if tx and x.dim() > 1:
            x = x.transpose(-1, -2)
        if ty and y.dim() > 1:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)

    return fn, [a.var("x"), a.var("y")]


@op("einsum")
def _einsum(a):
    equation = a.const("equation")
    return (lambda *xs: torch.einsum(equation, *xs)), list(a.var("values"))


def _same_pads(in_sizes, kernel, strides, dilations, lower):
    pads = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        pads += [total - small, small] if lower else [small, total - small]
    return pads


def _conv_pads(a, kernel, strides, dilations):
    spatial = a.in_shape("x")[2:]
    pad_type = a.const("pad_type", "valid")
    a.covers("pad")  # meaningful only for pad_type custom
    if pad_type == "valid":
        return [0] * (2 * len(spatial))
    if pad_type == "custom":
        return a.ints("pad")
    if pad_type in ("same", "same_lower"):
        return _same_pads(spatial, kernel, strides, dilations, pad_type == "same_lower")
    raise ValueError(f"pad_type {pad_type!r} is not in the MIL op reference")


def _torch_pad(pads):
    """MIL [b0, e0, b1, e1, ...] (first spatial axis first) -> F.pad order (last axis first)."""
    out = []
    for i in reversed(range(len(pads) // 2)):
        out += [pads[2 * i], pads[2 * i + 1]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("conv")
def _conv(a):
    w = a.var("weight")
    nd = len(w.shape) - 2
    kernel = w.shape[2:]
    strides = a.ints("strides", [1] * nd)
    dilations = a.ints("dilations", [1] * nd)
    groups = int(a.scalar("groups", 1))
    pads = _conv_pads(a, kernel, strides, dilations)
    conv = _CONV[nd]
    symmetric = all(pads[2 * i] == pads[2 * i + 1] for i in range(nd))
    padding = [pads[2 * i] for i in range(nd)] if symmetric else 0
    pre = None if symmetric else _torch_pad(pads)
    bias = [a.var("bias")] if a.has("bias") else []
    if groups == 1 and all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads):
        if _prepackable(a):
            return packed_pointwise_conv, [a.var("x"), packed_linear_weight(w, gemm_rows(a.in_shape(), 1))] + bias
        return pointwise_conv, [a.var("x"), w] + bias
    if nd == 2 and pre is None and _prepackable(a) and onednn.conv_worth_packing(w.shape, a.in_shape()):
        fn, packed = _packed_conv(w, padding, strides, dilations, groups, a.in_shape())
        return fn, [a.var("x"), packed] + bias

    on_cpu = torch.device(a.device).type == "cpu"

    def fn(x, w, b=None):
        if pre is not None:
            x = F.pad(x, pre)
        if on_cpu and x.numel() < w.numel() and not x.is_contiguous():
            # A channels-last input (a 1x1 convolution's GEMM made it) would have oneDNN copy the
            # larger weight to channels-last at every call; copying the input is cheaper.
            x = x.contiguous()
        return conv(x, w, b, strides, padding, dilations, groups)

    return fn, [a.var("x"), w] + bias


def _packed_conv(w, padding, strides, dilations, groups, input_shape):
    """(fn, the packed weight) of a 2-d convolution on oneDNN's layout, packed for `input_shape`."""
    settings = (tuple(padding), tuple(strides), tuple(dilations), groups)
    packed = Derived(lambda t: onednn.pack_conv(t, *settings, input_shape), [w], ("conv",) + settings + (input_shape,))
    return (lambda x, pw, b=None: onednn.conv(x, pw, b, *settings)), packed


def pointwise_conv(x, w, b=None):
    """A 1x1 convolution as one GEMM on a channels-last view: F.linear is addmm with the bias fused
    (cuBLAS beats cuDNN's 1x1 convolutions here). Logically NCHW; channels-last in memory."""
    return F.linear(x.movedim(1, -1), w.reshape(w.shape[0], w.shape[1]), b).movedim(-1, 1)


@op("conv_transpose")
def _conv_transpose(a):
    w = a.var("weight")
    nd = len(w.shape) - 2
    strides = a.ints("strides", [1] * nd)
    dilations = a.ints("dilations", [1] * nd)
    groups = int(a.scalar("groups", 1))
    pad_type = a.const("pad_type", "valid")
    a.covers("pad", "output_shape")  # output_shape is the declared output shape, used below
    out_sizes = a.out_shape[2:]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(a.in_shape("x")[2:], strides, w.shape[2:], dilations)]
    if pad_type == "custom":
        begins = a.ints("pad")[0::2]
    elif pad_type == "same":
        begins = [max(f - o, 0) // 2 for f, o in zip(full, out_sizes)]
    else:
        begins = [0] * nd
    conv = _CONV_T[nd]

    def fn(x, w, b=None):
        y = conv(x, w, None, strides, 0, 0, groups, dilations)
        index = [slice(None), slice(None)] + [slice(bg, bg + o) for bg, o in zip(begins, out_sizes)]
        y = y[tuple(index)]
        short = [o - s for o, s in zip(out_sizes, y.shape[2:])]
        if any(short):  # output_shape larger than the transposed conv: zeros at the end
            y = F.pad(y, _torch_pad([v for s in short for v in (0, s)]))
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * nd)
        return y

    return fn, [a.var("x"), w] + ([a.var("bias")] if a.has("bias") else [])


def _pool_setup(a):
    kernel = a.ints("kernel_sizes")
    nd = len(kernel)
    strides = a.ints("strides", [1] * nd)
    pads = _conv_pads(a, kernel, strides, [1] * nd)
    return kernel, strides, pads, bool(a.scalar("ceil_mode", False))


@op("max_pool")
def _max_pool(a):
    kernel, strides, pads, ceil_mode = _pool_setup(a)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    tp = _torch_pad(pads)

    def fn(x):
        return pool(F.pad(x, tp, value=-math.inf), kernel, strides, 0, 1, ceil_mode)

    return fn, [a.var("x")]


@op("avg_pool")
def _avg_pool(a):
    kernel, strides, pads, ceil_mode = _pool_setup(a)
    exclude = bool(a.scalar("exclude_padding_from_average", False))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    tp = _torch_pad(pads)

    def fn(x):
        total = pool(F.pad(x, tp), kernel, strides, 0, ceil_mode, True)
        if not exclude:
            return total
        ones = F.pad(torch.ones_like(x[:1, :1]), tp)
        return total / pool(ones, kernel, strides, 0, ceil_mode, True)

    return fn, [a.var("x")]


@op("l2_pool")
def _l2_pool(a):
    # sqrt of the sum of squares over each window, padding counted as zeros (coremltools' expected
    # values for "same"); a sum pool is an avg_pool with divisor 1, 1-D run as 2-D of height 1.
    kernel, strides, pads, ceil_mode = _pool_setup(a)
    tp = _torch_pad(pads)
    if len(kernel) == 1:
        kernel, strides = [1] + kernel, [1] + strides

    def fn(x):
        sq = F.pad(x.square(), tp)
        y = sq.unsqueeze(-2) if sq.dim() == 3 else sq
        y = F.avg_pool2d(y, kernel, strides, 0, ceil_mode, True, 1).sqrt()
        return y.squeeze(-2) if sq.dim() == 3 else y

    return fn, [a.var("x")]


def _param_view(t, rank, axes):
    shape = [1] * rank
    for ax, size in zip(axes, t.shape):
        shape[ax] = size
    return t.reshape(shape)


@op("layer_norm")
def _layer_norm(a):
    rank = len(a.in_shape())
    axes = sorted(norm_axes(a.ints("axes", list(range(rank))), rank))
    eps = a.scalar("epsilon", 1e-5)
    norm_shape = [a.in_shape()[i] for i in axes]
    ins = [a.var("x")] + [a.var(n) for n in ("gamma", "beta") if a.has(n)]
    has_g, has_b = a.has("gamma"), a.has("beta")

    def split(params):
        g = params[0] if has_g else None
        b = params[-1] if has_b else None
        return g, b

    last = list(range(rank - len(axes), rank))
    if axes == last or torch.device(a.device).type == "cpu":
        def fn(x, *params):
            # Axes that are not trailing (the channels of a (B, C, 1, S) layout) are moved last as a view
            # on the CPU, so one native kernel runs instead of six elementwise ops. CUDA keeps the six-op
            # form its benchmarks measured (the moved view made no difference there: 7.37-7.40 ms a step).
            g, b = split(params)
            return F.layer_norm(x.movedim(axes, last), norm_shape, g, b, eps).movedim(last, axes)
    else:
        def fn(x, *params):
            g, b = split(params)
            mean = x.mean(axes, keepdim=True)
            var = (x - mean).square().mean(axes, keepdim=True)
            y = (x - mean) * torch.rsqrt(var + eps)
            if g is not None:
                y = y * _param_view(g, rank, axes)
            if b is not None:
                y = y + _param_view(b, rank, axes)
            return y

    return fn, ins


@op("instance_norm")
def _instance_norm(a):
    eps = a.scalar("epsilon", 1e-5)
    ins = [a.var("x")] + [a.var(n) for n in ("gamma", "beta") if a.has(n)]
    has_g, has_b = a.has("gamma"), a.has("beta")

    def fn(x, *params):
        g = params[0] if has_g else None
        b = params[-1] if has_b else None
        return F.instance_norm(x, weight=g, bias=b, eps=eps)

    return fn, ins


@op("batch_norm")
def _batch_norm(a):
    eps = a.scalar("epsilon", 1e-5)
    ins = [a.var("x"), a.var("mean"), a.var("variance")]
    ins += [a.var(n) for n in ("gamma", "beta") if a.has(n)]
    has_g, has_b = a.has("gamma"), a.has("beta")

    def fn(x, mean, var, *params):
        # iOS17 lets the parameters' dtype differ from x's: compute in the wider of the two.
        dt = torch.promote_types(x.dtype, mean.dtype)
        g = params[0].to(dt) if has_g else None
        b = params[-1].to(dt) if has_b else None
        return F.batch_norm(x.to(dt), mean.to(dt), var.to(dt), g, b, False, 0.0, eps)

    return fn, ins


@op("l2_norm")
def _l2_norm(a):
    rank = len(a.in_shape())
    eps = a.scalar("epsilon", 1e-6)
    axes = list(range(rank - 3, rank))  # the reference: rank >= 3, the last 3 axes normalised together

    def fn(x):
        return x / torch.sqrt(x.square().sum(axes, keepdim=True) + eps)

    return fn, [a.var("x")]


_REDUCE = {
    "reduce_mean": lambda x, ax, k: x.mean(ax, keepdim=k),
    "reduce_sum": lambda x, ax, k: x.sum(ax, keepdim=k),
    "reduce_prod": lambda x, ax, k: _reduce_each(torch.prod, x, ax, k),
    "reduce_max": lambda x, ax, k: torch.amax(x, ax, keepdim=k),
    "reduce_min": lambda x, ax, k: torch.amin(x, ax, keepdim=k),
    "reduce_sum_square": lambda x, ax, k: x.square().sum(ax, keepdim=k),
    "reduce_l1_norm": lambda x, ax, k: x.abs().sum(ax, keepdim=k),
    "reduce_l2_norm": lambda x, ax, k: x.square().sum(ax, keepdim=k).sqrt(),
    "reduce_log_sum": lambda x, ax, k: x.sum(ax, keepdim=k).log(),
    "reduce_log_sum_exp": lambda x, ax, k: torch.logsumexp(x, ax, keepdim=k),
}


def _reduce_each(fn, x, axes, keep):
    for ax in sorted(axes, reverse=True):
        x = fn(x, ax, keepdim=keep) if keep else fn(x, ax)
    return x


def _reduction(name):
    red = _REDUCE[name]

    @op(name)
    def build(a):
        rank = len(a.in_shape())
        axes = a.ints("axes")
        axes = list(range(rank)) if axes is None else norm_axes(axes, rank)
        keep = bool(a.scalar("keep_dims", False))
        out_shape = a.out_shape
        if not axes:  # empty axes in MIL reduces nothing
            return (lambda x: x), [a.var("x")]
        return (lambda x: red(x, axes, keep).reshape(out_shape)), [a.var("x")]


for _n in _REDUCE:
    _reduction(_n)


@op("reduce_argmax", "reduce_argmin")
def _reduce_arg(a):
    axis = int(a.scalar("axis", -1))
    keep = bool(a.scalar("keep_dims", False))
    a.covers("output_dtype")  # the declared output dtype
    fn = torch.argmax if a.type == "reduce_argmax" else torch.argmin
    return (lambda x: fn(x, axis, keepdim=keep)), [a.var("x")]


@op("scaled_dot_product_attention")
def _sdpa(a):
    ins = [a.var("query"), a.var("key"), a.var("value")]
    if a.has("attn_mask"):
        ins.append(a.var("attn_mask"))

    def fn(q, k, v, mask=None):
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return fn, ins
