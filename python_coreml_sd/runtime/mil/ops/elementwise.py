"""Elementwise unary/binary ops and activations (numpy broadcasting, as MIL specifies)."""
import torch
import torch.nn.functional as F

from .registry import op

_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "real_div": torch.div,
    "floor_div": lambda x, y: torch.div(x, y, rounding_mode="floor"),
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "mod": torch.remainder,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "less": torch.lt,
    "less_equal": torch.le,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}

_UNARY = {
    "abs": torch.abs,
    "acos": torch.acos,
    "asin": torch.asin,
    "atan": torch.atan,
    "atanh": torch.atanh,
    "ceil": torch.ceil,
    "cos": torch.cos,
    "cosh": torch.cosh,
    "erf": torch.erf,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "floor": torch.floor,
    "logical_not": torch.logical_not,
    "sign": torch.sign,
    "sin": torch.sin,
    "sinh": torch.sinh,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "tan": torch.tan,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "relu6": lambda x: torch.clamp(x, 0.0, 6.0),
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "identity": lambda x: x,
    "round": torch.round,  # half to even: the reference says 0.5 rounds to 0
}


def _binary(name):
    fn = _BINARY[name]
    op(name)(lambda a: (fn, [a.var("x"), a.var("y")]))


def _unary(name):
    fn = _UNARY[name]
    op(name)(lambda a: (fn, [a.var("x")]))


for _n in _BINARY:
    _binary(_n)
for _n in _UNARY:
    _unary(_n)


@op("clip")
def _clip(a):
    lo, hi = a.scalar("alpha"), a.scalar("beta")
    return (lambda x: torch.clamp(x, lo, hi)), [a.var("x")]


@op("threshold")
def _threshold(a):
    lo = a.scalar("alpha")
    return (lambda x: torch.clamp(x, min=lo)), [a.var("x")]


@op("inverse")
def _inverse(a):
    eps = a.scalar("epsilon", 1e-4)
    return (lambda x: 1.0 / (x + eps)), [a.var("x")]


@op("log")
def _log(a):
    eps = a.scalar("epsilon", 1e-45)
    return (lambda x: torch.log(x + eps)), [a.var("x")]


@op("rsqrt")
def _rsqrt(a):
    eps = a.scalar("epsilon", 1e-12)
    return (lambda x: torch.rsqrt(x + eps)), [a.var("x")]


@op("cast")
def _cast(a):
    a.covers("dtype")  # the declared output dtype
    dt = a.out_torch_dtype()
    return (lambda x: x.to(dt)), [a.var("x")]


@op("gelu")
def _gelu(a):
    mode = a.const("mode", "EXACT")
    if mode == "EXACT":
        fn = F.gelu
    elif mode == "TANH_APPROXIMATION":
        fn = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    elif mode == "SIGMOID_APPROXIMATION":
        fn = lambda x: x * torch.sigmoid(1.702 * x)  # noqa: E731
    else:
        raise ValueError(f"gelu mode {mode!r} is not in the MIL op reference")
    return fn, [a.var("x")]


@op("softmax")
def _softmax(a):
    axis = a.scalar("axis", -1)
    return (lambda x: torch.softmax(x, axis)), [a.var("x")]


@op("leaky_relu")
def _leaky_relu(a):
    alpha = a.scalar("alpha", 0.01)
    return (lambda x: F.leaky_relu(x, alpha)), [a.var("x")]


@op("elu")
def _elu(a):
    alpha = a.scalar("alpha", 1.0)
    return (lambda x: torch.where(x > 0, x, alpha * (torch.exp(x) - 1))), [a.var("x")]


@op("clamped_relu")
def _clamped_relu(a):
    alpha, beta = a.scalar("alpha"), a.scalar("beta")
    return (lambda x: torch.clamp(torch.where(x >= 0, x, alpha * x), max=beta)), [a.var("x")]


@op("linear_activation")
def _linear_activation(a):
    alpha, beta = a.scalar("alpha"), a.scalar("beta", 0.0)
    return (lambda x: alpha * x + beta), [a.var("x")]


@op("scaled_tanh")
def _scaled_tanh(a):
    alpha, beta = a.scalar("alpha", 1.0), a.scalar("beta", 1.0)
    return (lambda x: alpha * torch.tanh(beta * x)), [a.var("x")]


@op("sigmoid_hard")
def _sigmoid_hard(a):
    alpha, beta = a.scalar("alpha", 0.2), a.scalar("beta", 0.5)
    return (lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)), [a.var("x")]


@op("thresholded_relu")
def _thresholded_relu(a):
    alpha = a.scalar("alpha", 1.0)
    # The MIL reference passes x >= alpha (its value_inference zeroes only x < alpha).
    return (lambda x: torch.where(x >= alpha, x, torch.zeros_like(x))), [a.var("x")]


def _channel_shape(a):
    """(1, C, 1, ...) for per-channel parameters on axis 1 of an input of any rank >= 3."""
    rank = len(a.in_shape())
    return (1, -1) + (1,) * (rank - 2)


@op("prelu")
def _prelu(a):
    shape = _channel_shape(a)

    def fn(x, alpha):
        return torch.where(x >= 0, x, alpha.reshape(shape) * x)

    return fn, [a.var("x"), a.var("alpha")]


@op("softplus_parametric")
def _softplus_parametric(a):
    shape = _channel_shape(a)

    def fn(x, alpha, beta):
        return alpha.reshape(shape) * F.softplus(beta.reshape(shape) * x)  # log(1 + e^z), no overflow

    return fn, [a.var("x"), a.var("alpha"), a.var("beta")]


@op("select")
def _select(a):
    return (lambda c, x, y: torch.where(c.bool(), x, y)), [a.var("cond"), a.var("a"), a.var("b")]

