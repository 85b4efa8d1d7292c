"""Each runtime op against an independent reference (NumPy, or torch functional on inputs we pad
ourselves), through a real .mlpackage round trip, on random shapes and attribute edge cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from mil_test_utils import run_mil

rng = np.random.default_rng(0)


def rand(*shape, lo=-2.0, hi=2.0, dtype=np.float32):
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def close(out, ref, tol=1e-5):
    ref = np.asarray(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol)


BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "maximum": np.maximum, "minimum": np.minimum, "pow": np.power,
    "floor_div": lambda x, y: np.floor(x / y), "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_broadcasting(name, tmp_path):
    x, y = rand(2, 3, 4, lo=0.5), rand(3, 1, lo=0.5)
    y[0, 0] = x[0, 0, 0]  # equality must be exercised
    out = run_mil(lambda x, y: getattr(mb, name)(x=x, y=y), {"x": x, "y": y}, tmp_path)[0]
    close(out, BINARY[name](x, y), 1e-5)


@pytest.mark.parametrize("name", ["logical_and", "logical_or", "logical_xor"])
def test_logical(name, tmp_path):
    x, y = rng.random((3, 4)) > 0.5, rng.random((4,)) > 0.5
    out = run_mil(lambda x, y: getattr(mb, name)(x=x, y=y), {"x": x, "y": y}, tmp_path)[0]
    np.testing.assert_array_equal(out, getattr(np, name)(x, y).astype(out.dtype))


_erf = np.vectorize(math.erf)
UNARY = {
    "abs": (np.abs, -2, 2), "acos": (np.arccos, -0.9, 0.9), "asin": (np.arcsin, -0.9, 0.9),
    "atan": (np.arctan, -2, 2), "atanh": (np.arctanh, -0.9, 0.9), "ceil": (np.ceil, -2, 2),
    "cos": (np.cos, -2, 2), "cosh": (np.cosh, -2, 2), "erf": (_erf, -2, 2), "exp": (np.exp, -2, 2),
    "exp2": (np.exp2, -2, 2), "floor": (np.floor, -2, 2), "sign": (np.sign, -2, 2),
    "sin": (np.sin, -2, 2), "sinh": (np.sinh, -2, 2), "sqrt": (np.sqrt, 0.1, 2),
    "square": (np.square, -2, 2), "tan": (np.tan, -1, 1), "tanh": (np.tanh, -2, 2),
    "relu": (lambda x: np.maximum(x, 0), -2, 2), "relu6": (lambda x: np.clip(x, 0, 6), -8, 8),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), -4, 4), "silu": (lambda x: x / (1 + np.exp(-x)), -4, 4),
    "softplus": (lambda x: np.log1p(np.exp(x)), -4, 4), "softsign": (lambda x: x / (1 + np.abs(x)), -4, 4),
    "round": (lambda x: np.round(x), -3, 3),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, tmp_path):
    fn, lo, hi = UNARY[name]
    x = rand(3, 5, lo=lo, hi=hi)
    if name == "round":
        x[0, :3] = [0.5, -1.5, 2.5]  # the MIL reference: 0.5 rounds to 0 (halves to even)
    out = run_mil(lambda x: getattr(mb, name)(x=x), {"x": x}, tmp_path)[0]
    close(out, fn(x.astype(np.float64)), 1e-5)


@pytest.mark.parametrize("name,kwargs,ref", [
    ("inverse", {"epsilon": 0.1}, lambda x: 1 / (x + 0.1)),
    ("log", {"epsilon": 0.5}, lambda x: np.log(x + 0.5)),
    ("rsqrt", {"epsilon": 0.2}, lambda x: 1 / np.sqrt(x + 0.2)),
    ("clip", {"alpha": -0.5, "beta": 0.7}, lambda x: np.clip(x, -0.5, 0.7)),
    ("threshold", {"alpha": 0.3}, lambda x: np.maximum(x, 0.3)),
    ("leaky_relu", {"alpha": 0.2}, lambda x: np.where(x >= 0, x, 0.2 * x)),
    ("elu", {"alpha": 0.7}, lambda x: np.where(x > 0, x, 0.7 * (np.exp(x) - 1))),
    ("clamped_relu", {"alpha": 0.1, "beta": 1.0}, lambda x: np.minimum(np.where(x >= 0, x, 0.1 * x), 1.0)),
    ("linear_activation", {"alpha": 2.0, "beta": -1.0}, lambda x: 2 * x - 1),
    ("scaled_tanh", {"alpha": 2.0, "beta": 0.5}, lambda x: 2 * np.tanh(0.5 * x)),
    ("sigmoid_hard", {"alpha": 0.3, "beta": 0.4}, lambda x: np.clip(0.3 * x + 0.4, 0, 1)),
    ("thresholded_relu", {"alpha": 0.5}, lambda x: np.where(x >= 0.5, x, 0)),
])
def test_unary_with_attributes(name, kwargs, ref, tmp_path):
    x = rand(4, 6, lo=0.0 if name in ("log", "rsqrt", "inverse") else -2.0)
    x[0, :2] = 0.5  # on the threshold: thresholded_relu passes x >= alpha
    kw = {k: np.float32(v) for k, v in kwargs.items()}
    out = run_mil(lambda x: getattr(mb, name)(x=x, **kw), {"x": x}, tmp_path)[0]
    close(out, ref(x.astype(np.float64)), 1e-5)


@pytest.mark.parametrize("mode", ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"])
def test_gelu_modes(mode, tmp_path):
    x = rand(3, 7, lo=-4, hi=4).astype(np.float64)
    ref = {
        "EXACT": 0.5 * x * (1 + _erf(x / np.sqrt(2))),
        "TANH_APPROXIMATION": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
        "SIGMOID_APPROXIMATION": x / (1 + np.exp(-1.702 * x)),
    }[mode]
    out = run_mil(lambda x: mb.gelu(x=x, mode=mode), {"x": x.astype(np.float32)}, tmp_path)[0]
    close(out, ref, 1e-5)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_axis(axis, tmp_path):
    x = rand(2, 5, 3, lo=-5, hi=5)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    out = run_mil(lambda x: mb.softmax(x=x, axis=axis), {"x": x}, tmp_path)[0]
    close(out, e / e.sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("shape", [(1, 3, 2), (2, 3, 2, 4), (1, 3, 2, 2, 3)])
def test_prelu_and_softplus_parametric(shape, tmp_path):
    x = rand(*shape)
    alpha, beta = rand(3, lo=0.1, hi=1), rand(3, lo=0.1, hi=1)
    # prelu takes rank 3 and 5 only with one alpha value (its type inference checks)
    p_alpha = alpha if len(shape) == 4 else np.full(3, alpha[0], np.float32)
    outs = run_mil(lambda x: (mb.prelu(x=x, alpha=p_alpha), mb.softplus_parametric(x=x, alpha=alpha, beta=beta)),
                   {"x": x}, tmp_path)
    view = (1, 3) + (1,) * (len(shape) - 2)  # per channel, axis 1, whatever the rank
    a, b = alpha.reshape(view), beta.reshape(view)
    close(outs[0], np.where(x >= 0, x, p_alpha.reshape(view) * x))
    close(outs[1], a * np.log1p(np.exp(b * x)))


@pytest.mark.parametrize("dtype,to", [("fp32", "int32"), ("fp32", "fp16"), ("int32", "fp32"), ("fp32", "bool")])
def test_cast(dtype, to, tmp_path):
    x = rand(3, 4, lo=-5, hi=5)
    if dtype == "int32":
        x = x.astype(np.int32)
    out = run_mil(lambda x: mb.cast(x=x, dtype=to), {"x": x}, tmp_path)[0]
    ref = {"int32": np.trunc(x).astype(np.int32), "fp16": x.astype(np.float16),
           "fp32": x.astype(np.float32), "bool": x != 0}[to]
    if to != "bool":  # Core ML I/O has no bool: the converter appends a cast to fp32
        assert out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref.astype(out.dtype))


def test_select(tmp_path):
    c, a, b = rng.random((2, 1, 4)) > 0.5, rand(2, 3, 4), rand(3, 4)
    out = run_mil(lambda c, a, b: mb.select(cond=c, a=a, b=b), {"c": c, "a": a, "b": b}, tmp_path)[0]
    close(out, np.where(c, a, b))


# ---- linear algebra --------------------------------------------------------------------------

def test_linear(tmp_path):
    x, w, b = rand(2, 5, 6), rand(4, 6), rand(4)
    outs = run_mil(lambda x: (mb.linear(x=x, weight=w, bias=b), mb.linear(x=x, weight=w)), {"x": x}, tmp_path)
    close(outs[0], x @ w.T + b, 1e-5)
    close(outs[1], x @ w.T, 1e-5)


@pytest.mark.parametrize("x_dtype", [np.int32, np.float16, np.float32])
@pytest.mark.parametrize("w_dtype", [np.int32, np.float16, np.float32])
def test_ios17_linear_and_matmul_mixed_dtypes(x_dtype, w_dtype, tmp_path):
    # iOS17: a const operand may have another dtype than x; the output takes x's dtype.
    x = rng.integers(-9, 10, size=(2, 3, 5)).astype(x_dtype)
    w, b, y, z = (rng.integers(-9, 10, size=s).astype(w_dtype) for s in ((4, 5), (4,), (5, 6), (4, 3)))
    outs = run_mil(lambda x: (mb.linear(x=x, weight=w, bias=b), mb.matmul(x=x, y=y), mb.matmul(x=z, y=x)),
                   {"x": x}, tmp_path)
    x64, w64, b64, y64, z64 = (v.astype(np.float64) for v in (x, w, b, y, z))
    for out, ref in zip(outs, (x64 @ w64.T + b64, x64 @ y64, z64 @ x64)):
        assert out.dtype == np.dtype(x_dtype)
        close(out, ref, 0)  # small integers: exact in every dtype


def test_integer_linear_with_fractional_float_weights_is_refused(tmp_path):
    from python_coreml_sd.runtime.mil.plan import UnsupportedOpError

    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    with pytest.raises(UnsupportedOpError, match="linear.*non-integer weight"):
        run_mil(lambda x: mb.linear(x=x, weight=np.full((2, 3), 0.5, np.float32)), {"x": x}, tmp_path)


@pytest.mark.parametrize("xs,ys,tx,ty", [
    ((3, 4), (4, 5), False, False),
    ((4, 3), (4, 5), True, False),
    ((2, 3, 4), (5, 4), False, True),
    ((2, 1, 4, 3), (3, 5, 4), True, True),
    ((4,), (2, 4, 3), False, False),
])
def test_matmul_transposes_and_broadcast(xs, ys, tx, ty, tmp_path):
    x, y = rand(*xs), rand(*ys)
    out = run_mil(lambda x, y: mb.matmul(x=x, y=y, transpose_x=tx, transpose_y=ty), {"x": x, "y": y}, tmp_path)[0]
    xr = np.swapaxes(x, -1, -2) if tx and x.ndim > 1 else x
    yr = np.swapaxes(y, -1, -2) if ty and y.ndim > 1 else y
    close(out, np.matmul(xr, yr), 1e-5)


@pytest.mark.parametrize("equation,xs,ys", [
    ("nchw,nwhu->nchu", (2, 3, 2, 4), (2, 4, 2, 5)),
    ("chw,whu->chu", (3, 2, 4), (4, 2, 5)),
])
def test_einsum(equation, xs, ys, tmp_path):
    """MIL einsum takes these two forms; the torch frontend lowers other equations to matmuls."""
    x, y = rand(*xs), rand(*ys)
    out = run_mil(lambda x, y: mb.einsum(values=(x, y), equation=equation), {"x": x, "y": y}, tmp_path)[0]
    close(out, np.einsum(equation, x, y), 1e-5)


# ---- convolution -----------------------------------------------------------------------------

def _same_pads_tf(size, k, s, d):
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total


def _ref_conv(x, w, b, strides, dilations, groups, pads):
    """pads: [(before, after)] per spatial axis; zero padding done with numpy."""
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    conv = {1: F.conv1d, 2: F.conv2d}[x.ndim - 2]
    y = conv(torch.from_numpy(xp).double(), torch.from_numpy(w).double(),
             None if b is None else torch.from_numpy(b).double(), strides, 0, dilations, groups)
    return y.numpy()


@pytest.mark.parametrize("pad_type,strides,dilations,groups,bias,kernel,size", [
    ("valid", [1, 1], [1, 1], 1, True, (3, 3), (7, 6)),
    ("same", [1, 1], [1, 1], 1, False, (3, 3), (7, 6)),
    ("same", [2, 2], [1, 1], 1, True, (4, 4), (7, 8)),
    ("same_lower", [2, 2], [1, 1], 1, True, (4, 2), (7, 8)),
    ("custom", [2, 1], [1, 2], 2, True, (3, 3), (9, 8)),
    ("same", [1, 1], [2, 2], 4, True, (3, 3), (6, 6)),
    ("valid", [1, 1], [1, 1], 1, True, (1, 1), (5, 5)),
])
def test_conv2d(pad_type, strides, dilations, groups, bias, kernel, size, tmp_path):
    cin, cout = 4, 8
    x = rand(2, cin, *size)
    w = rand(cout, cin // groups, *kernel)
    b = rand(cout) if bias else None
    custom = [1, 2, 0, 1]
    kw = dict(weight=w, strides=strides, dilations=dilations, groups=groups, pad_type=pad_type)
    if bias:
        kw["bias"] = b
    if pad_type == "custom":
        kw["pad"] = np.array(custom, np.int32)
    out = run_mil(lambda x: mb.conv(x=x, **kw), {"x": x}, tmp_path)[0]
    if pad_type == "valid":
        pads = [(0, 0), (0, 0)]
    elif pad_type == "custom":
        pads = [(1, 2), (0, 1)]
    else:
        pads = []
        for n, k, s, d in zip(size, kernel, strides, dilations):
            t = _same_pads_tf(n, k, s, d)
            pads.append((t // 2, t - t // 2) if pad_type == "same" else (t - t // 2, t // 2))
    close(out, _ref_conv(x, w, b, strides, dilations, groups, pads), 1e-4)


def test_conv1d_same(tmp_path):
    x, w = rand(1, 3, 10), rand(5, 3, 4)
    out = run_mil(lambda x: mb.conv(x=x, weight=w, pad_type="same", strides=[3]), {"x": x}, tmp_path)[0]
    t = _same_pads_tf(10, 4, 3, 1)
    close(out, _ref_conv(x, w, None, [3], [1], 1, [(t // 2, t - t // 2)]), 1e-4)


def _ref_conv_transpose(x, w, stride):
    """Scatter-add definition: every input pixel stamps the kernel at stride spacing."""
    n, cin, h, wd = x.shape
    cout, k = w.shape[1], w.shape[2]
    y = np.zeros((n, cout, (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(h):
        for j in range(wd):
            y[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum("nc,cokl->nokl", x[:, :, i, j], w)
    return y


@pytest.mark.parametrize("pad_type,pad,output_shape", [
    ("valid", None, None), ("custom", [1, 1, 0, 1], None), ("same", None, None), ("valid", None, (1, 3, 10, 10)),
])
def test_conv_transpose(pad_type, pad, output_shape, tmp_path):
    x, w, b = rand(1, 2, 4, 4), rand(2, 3, 3, 3), rand(3)
    kw = dict(weight=w, bias=b, strides=[2, 2], pad_type=pad_type)
    if pad is not None:
        kw["pad"] = np.array(pad, np.int32)
    if output_shape is not None:
        kw["output_shape"] = np.array(output_shape, np.int32)
    out = run_mil(lambda x: mb.conv_transpose(x=x, **kw), {"x": x}, tmp_path)[0]
    full = _ref_conv_transpose(x, w, 2) + b.reshape(1, 3, 1, 1)  # 9x9
    if pad_type == "custom":
        ref = full[:, :, 1:9 - 1, 0:9 - 1]
    elif pad_type == "same":
        ref = full[:, :, 0:8, 0:8]  # output = input * stride; the extra row/column is dropped at the end
    elif output_shape is not None:
        ref = np.pad(full - b.reshape(1, 3, 1, 1), [(0, 0), (0, 0), (0, 1), (0, 1)]) + b.reshape(1, 3, 1, 1)
    else:
        ref = full
    close(out, ref, 1e-4)


@pytest.mark.parametrize("kind", ["max_pool", "avg_pool", "avg_pool_exclude"])
def test_pools(kind, tmp_path):
    x = rand(1, 2, 5, 6)
    op = mb.max_pool if kind == "max_pool" else mb.avg_pool
    kw = dict(kernel_sizes=[3, 2], strides=[2, 2], pad_type="custom", pad=np.array([1, 1, 0, 1], np.int32))
    if kind != "max_pool":
        kw["exclude_padding_from_average"] = kind == "avg_pool_exclude"
    out = run_mil(lambda x: op(x=x, **kw), {"x": x}, tmp_path)[0]
    fill = -np.inf if kind == "max_pool" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (0, 1)], constant_values=fill)
    valid = np.pad(np.ones_like(x), [(0, 0), (0, 0), (1, 1), (0, 1)])
    oh, ow = (xp.shape[2] - 3) // 2 + 1, (xp.shape[3] - 2) // 2 + 1
    ref = np.zeros((1, 2, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 2]
            if kind == "max_pool":
                ref[:, :, i, j] = win.max(axis=(2, 3))
            elif kind == "avg_pool":
                ref[:, :, i, j] = win.mean(axis=(2, 3))
            else:
                ref[:, :, i, j] = win.sum(axis=(2, 3)) / valid[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 2].sum(axis=(2, 3))
    close(out, ref, 1e-5)


# ---- normalization and reductions ------------------------------------------------------------

def _np_norm(x, axes, eps):
    m = x.mean(axis=tuple(axes), keepdims=True)
    v = ((x - m) ** 2).mean(axis=tuple(axes), keepdims=True)
    return (x - m) / np.sqrt(v + eps)


@pytest.mark.parametrize("axes,affine", [([-1], True), ([1], True), ([1, 2, 3], True), ([2, 3], False), ([0, 2], True)])
def test_layer_norm_axes(axes, affine, tmp_path):
    x = rand(2, 6, 1, 5, lo=-3, hi=3)
    shape = [x.shape[a] for a in axes]
    g, b = rand(*shape), rand(*shape)
    kw = dict(gamma=g, beta=b) if affine else {}
    out = run_mil(lambda x: mb.layer_norm(x=x, axes=axes, epsilon=1e-3, **kw), {"x": x}, tmp_path)[0]
    ref = _np_norm(x.astype(np.float64), [a % 4 for a in axes], 1e-3)
    if affine:
        view = [1] * 4
        for a, n in zip([a % 4 for a in axes], shape):
            view[a] = n
        ref = ref * g.reshape(view) + b.reshape(view)
    close(out, ref, 1e-4)


def test_instance_and_batch_norm(tmp_path):
    x = rand(2, 3, 4, 5)
    g, b, mean, var = rand(3), rand(3), rand(3), rand(3, lo=0.5, hi=2)
    outs = run_mil(lambda x: (mb.instance_norm(x=x, gamma=g, beta=b, epsilon=1e-4),
                              mb.batch_norm(x=x, mean=mean, variance=var, gamma=g, beta=b, epsilon=1e-4)),
                   {"x": x}, tmp_path)
    v = lambda p: p.reshape(1, 3, 1, 1)  # noqa: E731
    close(outs[0], _np_norm(x.astype(np.float64), [2, 3], 1e-4) * v(g) + v(b), 1e-4)
    close(outs[1], (x - v(mean)) / np.sqrt(v(var) + 1e-4) * v(g) + v(b), 1e-4)


@pytest.mark.parametrize("x_dtype,p_dtype", [(np.float32, np.float16), (np.float16, np.float32)])
def test_ios17_batch_norm_with_parameters_of_another_dtype(x_dtype, p_dtype, tmp_path):
    # The builder's default epsilon is an fp32 const even beside fp16 mean/variance.
    x = rand(1, 3, 2, 4, lo=-16, hi=16).astype(x_dtype)
    mean, var = np.array([9, 6, 3], p_dtype), np.array([6, 1, 7], p_dtype)
    g, b = np.array([1, 2, 0.5], p_dtype), np.array([1, 3, 0], p_dtype)
    outs = run_mil(lambda x: (mb.batch_norm(x=x, mean=mean, variance=var),
                              mb.batch_norm(x=x, mean=mean, variance=var, gamma=g, beta=b)), {"x": x}, tmp_path)
    v = lambda p: p.astype(np.float64).reshape(1, 3, 1, 1)  # noqa: E731
    norm = (x.astype(np.float64) - v(mean)) / np.sqrt(v(var) + 1e-5)
    tol = 1e-2 if x_dtype == np.float16 else 1e-5
    close(outs[0], norm, tol)
    close(outs[1], norm * v(g) + v(b), tol)


REDUCE = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod, "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
}


@pytest.mark.parametrize("name", sorted(REDUCE))
@pytest.mark.parametrize("axes,keep", [([1], False), ([0, -1], True), (None, False)])
def test_reductions(name, axes, keep, tmp_path):
    x = rand(2, 3, 4, lo=0.5, hi=1.5)
    kw = {"keep_dims": keep}
    if axes is not None:
        kw["axes"] = axes
    out = run_mil(lambda x: getattr(mb, name)(x=x, **kw), {"x": x}, tmp_path)[0]
    ref = REDUCE[name](x.astype(np.float64), axis=None if axes is None else tuple(axes), keepdims=keep)
    close(out, ref, 1e-5)


@pytest.mark.parametrize("name", ["reduce_argmax", "reduce_argmin"])
def test_reduce_arg(name, tmp_path):
    x = rand(3, 5, 4)
    out = run_mil(lambda x: getattr(mb, name)(x=x, axis=1, keep_dims=True), {"x": x}, tmp_path)[0]
    fn = np.argmax if name == "reduce_argmax" else np.argmin
    np.testing.assert_array_equal(out, fn(x, axis=1)[:, None, :])


# ---- shape and indexing ----------------------------------------------------------------------

def test_reshape_transpose_expand_squeeze(tmp_path):
    x = rand(2, 3, 4)
    outs = run_mil(lambda x: (mb.reshape(x=x, shape=[4, -1, 3]), mb.transpose(x=x, perm=[2, 0, 1]),
                              mb.expand_dims(x=x, axes=[0, -1]),
                              mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1])), {"x": x}, tmp_path)
    close(outs[0], x.reshape(4, -1, 3))
    close(outs[1], x.transpose(2, 0, 1))
    close(outs[2], x[None, ..., None])
    close(outs[3], x)


@pytest.mark.parametrize("begin,end,stride,bmask,emask,smask", [
    ([0, 1, 0], [2, 3, 4], [1, 1, 2], [0, 0, 0], [0, 0, 0], [0, 0, 0]),
    ([1, 0, -1], [0, 0, 0], [1, 1, -1], [0, 1, 0], [1, 1, 1], [0, 0, 0]),
    ([0, -2, 3], [0, -1, 0], [1, 1, -2], [1, 0, 0], [1, 0, 1], [0, 0, 0]),
    ([1, 0, 2], [2, 3, 3], [1, 1, 1], [0, 0, 0], [0, 1, 0], [1, 0, 1]),
])
def test_slice_by_index_masks(begin, end, stride, bmask, emask, smask, tmp_path):
    x = rand(3, 4, 5)
    masks = dict(begin_mask=np.array(bmask, bool), end_mask=np.array(emask, bool), squeeze_mask=np.array(smask, bool))
    out = run_mil(lambda x: mb.slice_by_index(x=x, begin=begin, end=end, stride=stride, **masks), {"x": x}, tmp_path)[0]
    index = []
    for b, e, s, bm, em, sm in zip(begin, end, stride, bmask, emask, smask):
        index.append(b if sm else slice(None if bm else b, None if em else e, s))
    close(out, x[tuple(index)])


def test_slice_by_size(tmp_path):
    x = rand(3, 4, 5)
    out = run_mil(lambda x: mb.slice_by_size(x=x, begin=[1, 0, 2], size=[2, -1, 2]), {"x": x}, tmp_path)[0]
    close(out, x[1:3, :, 2:4])


@pytest.mark.parametrize("interleave", [False, True])
def test_concat(interleave, tmp_path):
    a, b = rand(2, 3, 4), rand(2, 3, 4)
    out = run_mil(lambda a, b: mb.concat(values=[a, b], axis=1, interleave=interleave), {"a": a, "b": b}, tmp_path)[0]
    ref = np.stack([a, b], axis=2).reshape(2, 6, 4) if interleave else np.concatenate([a, b], axis=1)
    close(out, ref)


def test_split_stack_tile(tmp_path):
    x = rand(2, 9, 4)
    outs = run_mil(lambda x: (*mb.split(x=x, split_sizes=[2, 3, 4], axis=1),
                              *mb.split(x=x, num_splits=2, axis=-1),
                              mb.stack(values=[x, x], axis=1), mb.tile(x=x, reps=[1, 2, 3])), {"x": x}, tmp_path)
    close(outs[0], x[:, :2]); close(outs[1], x[:, 2:5]); close(outs[2], x[:, 5:])  # noqa: E702
    close(outs[3], x[..., :2]); close(outs[4], x[..., 2:])  # noqa: E702
    close(outs[5], np.stack([x, x], axis=1))
    close(outs[6], np.tile(x, (1, 2, 3)))


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad_modes(mode, tmp_path):
    x = rand(1, 2, 4, 5)
    pads = [1, 2, 2, 1]
    out = run_mil(lambda x: mb.pad(x=x, pad=np.array(pads, np.int32), mode=mode, constant_val=np.float32(0.5)),
                  {"x": x}, tmp_path)[0]
    np_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    kw = {"constant_values": 0.5} if mode == "constant" else {}
    close(out, np.pad(x, [(0, 0), (0, 0), (1, 2), (2, 1)], mode=np_mode, **kw))


@pytest.mark.parametrize("axis,batch_dims", [(0, 0), (1, 0), (-1, 0), (1, 1)])
def test_gather(axis, batch_dims, tmp_path):
    x = rand(3, 4, 5)
    n = x.shape[axis]
    idx = rng.integers(-n, n, size=(3, 2) if batch_dims else (2, 3)).astype(np.int32)
    out = run_mil(lambda x, i: mb.gather(x=x, indices=i, axis=axis, batch_dims=batch_dims),
                  {"x": x, "i": idx}, tmp_path, target="iOS17")[0]
    if batch_dims:
        ref = np.stack([np.take(x[b], idx[b], axis=axis - 1) for b in range(3)])
    else:
        ref = np.take(x, idx, axis=axis)
    close(out, ref)


def test_gather_along_axis_and_nd(tmp_path):
    x = rand(3, 4, 5)
    idx = rng.integers(0, 4, size=(3, 2, 5)).astype(np.int32)
    nd = np.array([[0, 1], [2, 3], [1, 0]], np.int32)
    outs = run_mil(lambda x, i, j: (mb.gather_along_axis(x=x, indices=i, axis=1), mb.gather_nd(x=x, indices=j)),
                   {"x": x, "i": idx, "j": nd}, tmp_path)
    close(outs[0], np.take_along_axis(x, idx, axis=1))
    close(outs[1], x[nd[:, 0], nd[:, 1]])


def test_cumsum_band_part_reverse(tmp_path):
    x = rand(3, 4)
    outs = run_mil(lambda x: (mb.cumsum(x=x, axis=1, exclusive=True, reverse=True), mb.band_part(x=x, lower=1, upper=0),
                              mb.reverse(x=x, axes=[0])), {"x": x}, tmp_path)
    rev = np.flip(np.cumsum(np.flip(x, 1), 1), 1) - x
    close(outs[0], rev, 1e-5)
    i, j = np.indices(x.shape)
    close(outs[1], np.where((i - j <= 1) & (j - i <= 0), x, 0))
    close(outs[2], x[::-1])


def test_depth_to_space_is_dcr_and_pixel_shuffle_is_crd(tmp_path):
    x = rand(1, 8, 2, 3)
    outs = run_mil(lambda x: (mb.depth_to_space(x=x, block_size=2),
                              mb.space_to_depth(x=mb.depth_to_space(x=x, block_size=2), block_size=2),
                              mb.pixel_shuffle(x=x, upscale_factor=2)), {"x": x}, tmp_path)
    dcr = np.zeros((1, 2, 4, 6), np.float32)  # TensorFlow order: channel (i * r + j) * C' + c
    crd = np.zeros((1, 2, 4, 6), np.float32)  # PyTorch order: channel c * r * r + i * r + j
    for c in range(2):
        for i in range(2):
            for j in range(2):
                dcr[0, c, i::2, j::2] = x[0, (i * 2 + j) * 2 + c]
                crd[0, c, i::2, j::2] = x[0, c * 4 + i * 2 + j]
    close(outs[0], dcr)
    close(outs[1], x)
    close(outs[2], crd)


# ---- resampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("sh,sw", [(2, 2), (3, 1), (1.5, 2.5), (1.12, 0.67), (0.5, 1.3)])
def test_upsample_nearest(sh, sw, tmp_path):
    x = rand(1, 2, 4, 3)
    out = run_mil(lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=sh, scale_factor_width=sw),
                  {"x": x}, tmp_path)[0]
    oh, ow = int(np.floor(4 * sh)), int(np.floor(3 * sw))
    # Core ML samples at the size ratio in/out, not 1/scale (they differ once the size is floored).
    ih = np.floor(np.arange(oh) * 4 / oh).astype(int)
    iw = np.floor(np.arange(ow) * 3 / ow).astype(int)
    close(out, x[:, :, ih][:, :, :, iw])


def test_upsample_fractional_scales_match_coremltools_expectations(tmp_path):
    # The expected values of coremltools' own op tests (TestUpsampleNearestNeighborFractionalScales,
    # TestUpsampleBilinear smoke): 1/scale gives [1.5, 1.5, -2.5] and [0, .08, .46, .85, 1].
    x = np.array([1.5, -2.5, 3.5], np.float32).reshape(1, 1, 1, 3)
    outs = run_mil(lambda x: (mb.upsample_nearest_neighbor(x=x, scale_factor_height=3.17, scale_factor_width=0.67),
                              mb.upsample_nearest_neighbor(x=x, scale_factor_height=2.0, scale_factor_width=1.12)),
                   {"x": x}, tmp_path)
    close(outs[0], np.array([1.5, -2.5] * 3, np.float32).reshape(1, 1, 3, 2))
    close(outs[1], np.array([1.5, -2.5, 3.5] * 2, np.float32).reshape(1, 1, 2, 3))
    r = np.array([0, 1], np.float32).reshape(1, 1, 2)
    out = run_mil(lambda r: mb.upsample_bilinear(x=r, scale_factor_height=1.0, scale_factor_width=2.6,
                                                 align_corners=False), {"r": r}, tmp_path)[0]
    close(out, np.array([0, 0.1, 0.5, 0.9, 1], np.float32).reshape(1, 1, 5), 1e-6)


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("scales", [(2.5, 2.0), (0.5, 0.75), (0.7, 1.3)])
def test_upsample_bilinear_fractional_matches_torch_at_fp32(align, scales, tmp_path):
    # coremltools' stress test compares with torch's interpolate (recompute_scale_factor=True: the
    # size ratio); at fp32 and a tight tolerance, 1/scale is off by up to tens on +-100 inputs.
    x = rand(2, 3, 10, 22, lo=-100, hi=100)
    out = run_mil(lambda x: mb.upsample_bilinear(x=x, scale_factor_height=scales[0], scale_factor_width=scales[1],
                                                 align_corners=align), {"x": x}, tmp_path)[0]
    ref = F.interpolate(torch.from_numpy(x), scale_factor=scales, mode="bilinear", align_corners=align,
                        recompute_scale_factor=True)
    close(out, ref.numpy(), 1e-3)  # float32 rounding of the sample positions on +-100 values


# Grid points for Xin = 2 from the MIL op reference (resize_bilinear notes).
DOC_GRIDS = {
    ("UNALIGN_CORNERS", 5): [0., 0.1, 0.5, 0.9, 1.], ("STRICT_ALIGN_CORNERS", 5): [0., 0.25, 0.5, 0.75, 1.],
    ("ALIGN_CORNERS", 5): [0., 0.25, 0.5, 0.75, 1.], ("DEFAULT", 5): [0., 0.4, 0.8, 1., 1.],
    ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
    ("UNALIGN_CORNERS", 6): [0., 0., 1 / 3, 2 / 3, 1., 1.], ("DEFAULT", 6): [0., 1 / 3, 2 / 3, 1., 1., 1.],
    ("OFFSET_CORNERS", 6): [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12],
}


@pytest.mark.parametrize("mode,xout", sorted(DOC_GRIDS))
def test_resize_bilinear_sampling_modes_match_reference_grids(mode, xout, tmp_path):
    x = np.array([0.0, 1.0], np.float32).reshape(1, 1, 1, 2)  # linear ramp: output = grid point
    out = run_mil(lambda x: mb.resize_bilinear(x=x, target_size_height=1, target_size_width=xout, sampling_mode=mode),
                  {"x": x}, tmp_path)[0]
    close(out.reshape(-1), DOC_GRIDS[(mode, xout)], 1e-6)


@pytest.mark.parametrize("align,half", [(True, False), (False, True), (False, False)])
def test_upsample_bilinear_alignment(align, half, tmp_path):
    x = rand(1, 2, 3, 4)
    out = run_mil(lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=2,
                                                 align_corners=align, half_pixel_centers=half),
                  {"x": x}, tmp_path, target="iOS16")[0]
    t = torch.from_numpy(x)
    if align:
        ref = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
    elif half:
        ref = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
    else:  # asymmetric: source = dst / scale (TF align_corners=False, half_pixel_centers=False)
        def axis(n):
            g = np.minimum(np.arange(2 * n) / 2, n - 1)
            lo = np.floor(g).astype(int)
            return lo, np.minimum(lo + 1, n - 1), g - lo
        (h0, h1, fh), (w0, w1, fw) = axis(3), axis(4)
        rows = x[:, :, h0] * (1 - fh)[:, None] + x[:, :, h1] * fh[:, None]
        ref = torch.from_numpy(rows[..., w0] * (1 - fw) + rows[..., w1] * fw)
    close(out, ref.numpy(), 1e-5)


# ---- attention (iOS18) -----------------------------------------------------------------------

@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_scaled_dot_product_attention(mask, tmp_path):
    q, k, v = rand(2, 3, 5, 4), rand(2, 3, 6, 4), rand(2, 3, 6, 4)
    inputs = {"q": q, "k": k, "v": v}
    m = None
    if mask == "bool":
        m = rng.random((5, 6)) > 0.3
        m[:, 0] = True
        inputs["m"] = m
    elif mask == "float":
        m = rand(5, 6)
        inputs["m"] = m
    out = run_mil(lambda q, k, v, m=None: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
                  inputs, tmp_path, target="iOS18")[0]
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / np.sqrt(4)
    if mask == "bool":
        s = np.where(m, s, -np.inf)
    elif mask == "float":
        s = s + m
    e = np.exp(s - s.max(-1, keepdims=True))
    close(out, (e / e.sum(-1, keepdims=True)) @ v, 1e-5)


# ---- fp16 programs ---------------------------------------------------------------------------

def test_fp16_program_rounds_like_fp16(tmp_path):
    """Each fp16 op's result is an fp16 value: 1 + 2^-11 is not representable, so it rounds to 1."""
    x = np.full((4,), 1.0, np.float16)
    out = run_mil(lambda x: mb.add(x=mb.add(x=x, y=np.float16(2 ** -11)), y=np.float16(2 ** -11)),
                  {"x": x}, tmp_path)[0]
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.float16(1.0) + np.float16(2 ** -11) + np.float16(2 ** -11))


def test_fp16_conv_matches_fp32_within_fp16_precision(tmp_path):
    x, w = rand(1, 8, 6, 6).astype(np.float16), rand(4, 8, 3, 3).astype(np.float16)
    out = run_mil(lambda x: mb.conv(x=x, weight=w, pad_type="same"), {"x": x}, tmp_path)[0]
    ref = _ref_conv(x.astype(np.float32), w.astype(np.float32), None, [1, 1], [1, 1], 1, [(1, 1), (1, 1)])
    assert out.dtype == np.float16
    close(out, ref.astype(np.float16).astype(np.float64), 2e-2)


def test_topk_argsort_l2_norm(tmp_path):
    x = rand(2, 3, 4, 5)
    outs = run_mil(lambda x: (*mb.topk(x=x, k=2, axis=-1, ascending=False), mb.argsort(x=x, axis=1, ascending=True),
                              mb.l2_norm(x=x, epsilon=1e-3)), {"x": x}, tmp_path)
    order = np.argsort(-x, axis=-1, kind="stable")[..., :2]
    close(outs[0], np.take_along_axis(x, order, -1))
    np.testing.assert_array_equal(outs[1], order)
    np.testing.assert_array_equal(outs[2], np.argsort(x, axis=1, kind="stable"))
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(1, 2, 3), keepdims=True) + 1e-3)
    close(outs[3], x / norm)


def test_range_fill_shape(tmp_path):
    x = rand(2, 3)
    outs = run_mil(lambda x: (mb.fill_like(ref_tensor=x, value=np.float32(2.5)), mb.add(x=x, y=mb.fill(shape=[2, 3], value=1.0))),
                   {"x": x}, tmp_path)
    close(outs[0], np.full((2, 3), 2.5))
    close(outs[1], x + 1)


def test_small_shape_ops(tmp_path):
    x = rand(2, 3, 4, 6)
    outs = run_mil(lambda x: (mb.crop(x=x, crop_height=[1, 1], crop_width=[2, 0]), mb.flatten2d(x=x, axis=2),
                              mb.identity(x=x), mb.logical_not(x=mb.greater(x=x, y=0.0)),
                              mb.resize_nearest_neighbor(x=x, target_size_height=8, target_size_width=3),
                              mb.shape(x=x), mb.add(x=mb.range_1d(start=1, end=7, step=2), y=0)),
                   {"x": x}, tmp_path)
    close(outs[0], x[:, :, 1:3, 2:])
    close(outs[1], x.reshape(6, 24))
    close(outs[2], x)
    close(outs[3], (x <= 0).astype(np.float32))
    close(outs[4], x[:, :, np.arange(8) // 2][:, :, :, np.arange(3) * 2])
    np.testing.assert_array_equal(outs[5], [2, 3, 4, 6])
    np.testing.assert_array_equal(outs[6], [1, 3, 5])


def test_quantize_dequantize(tmp_path):
    x = rand(2, 3, lo=-3, hi=3)
    scale = np.array([0.05, 0.1, 0.02], np.float32)
    zp = np.array([3, -2, 0], np.int8)
    outs = run_mil(lambda x: mb.dequantize(input=mb.quantize(input=x, scale=scale, zero_point=zp, axis=1,
                                                             output_dtype="int8"), scale=scale, zero_point=zp, axis=1),
                   {"x": x}, tmp_path, target="iOS17")
    q = np.clip(np.round(x / scale) + zp, -128, 127)
    close(outs[0], (q - zp) * scale, 1e-6)


def test_non_zero_has_a_run_time_length(tmp_path):
    """non_zero (Apple's safety checker uses it to zero flagged images): row-major (N, rank) int32
    indices, N known only at run time, and ops after it take that length."""
    x = rand(3, 4)
    x[x < 0] = 0
    outs = run_mil(lambda x: (mb.non_zero(x=x), mb.gather_nd(x=x, indices=mb.non_zero(x=x))), {"x": x}, tmp_path)
    np.testing.assert_array_equal(outs[0], np.argwhere(x))
    assert outs[0].dtype == np.int32
    close(outs[1], x[x != 0])


@pytest.mark.parametrize("mode", ["update", "add", "mul", "max"])
def test_scatter_nd(mode, tmp_path):
    data = rand(3, 4, 2)
    indices = np.array([[0, 1], [2, 3], [0, 1]], dtype=np.int32)  # a repeated index combines in order
    updates = rand(3, 2)
    out = run_mil(lambda data, indices, updates: mb.scatter_nd(data=data, indices=indices, updates=updates, mode=mode),
                  {"data": data, "indices": indices, "updates": updates}, tmp_path)[0]
    expected = data.astype(np.float64).copy()
    combine = {"update": lambda old, new: new, "add": np.add, "mul": np.multiply, "max": np.maximum}[mode]
    for (i, j), value in zip(indices, updates):
        expected[i, j] = combine(expected[i, j], value)
    close(out, expected)


def test_zeroing_by_a_run_time_mask(tmp_path):
    """The chain Apple's safety checker converts `images[mask] = 0` to: non_zero, its shape, a scalar
    slice of it joined by concat, tile by those run-time reps, scatter_nd."""
    images = rand(1, 4, 4, 3)
    mask = (rand(1, 4, 4, 3) > 0).astype(np.float32)

    def build(images, mask):
        where = mb.non_zero(x=mask)
        count = mb.slice_by_index(x=mb.shape(x=where), begin=[0], end=[1], squeeze_mask=[True])
        zeros = mb.tile(x=np.zeros((1,), np.float32), reps=mb.concat(values=[count], axis=0))
        return mb.scatter_nd(data=images, indices=where, updates=zeros, mode="update")

    out = run_mil(build, {"images": images, "mask": mask}, tmp_path)[0]
    close(out, np.where(mask != 0, 0.0, images))
