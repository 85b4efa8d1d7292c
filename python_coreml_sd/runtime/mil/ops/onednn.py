"""CPU convolutions and linears on weights laid out for oneDNN once, at load.

PyTorch's eager conv2d / linear hand oneDNN a plain weight at every call, and oneDNN reorders it to
its blocked layout each time: for a large weight read by a small activation (the SD UNet's 8x8 and
16x16 levels) that copy is up to half of the convolution's time. The prepacked ops Inductor's CPU freezing
calls (`mkldnn._convolution_pointwise`, `mkldnn._linear_pointwise`) take the weight reordered once;
no library exposes them for eager use, hence these few wrappers. Same fp32 arithmetic, another
blocking: results differ from F.conv2d / F.linear by fp32 rounding only.
"""
import math

import torch


def _ops_present():
    try:
        return torch.backends.mkldnn.is_available() and all(
            callable(getattr(torch.ops.mkldnn, name)) for name in (
                "_reorder_convolution_weight", "_convolution_pointwise", "_reorder_linear_weight",
                "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _ops_present()


def conv_worth_packing(weight_shape, input_shape):
    """Measured on 2 cores of an AVX-512 AMD EPYC (SD 1.5 UNet shapes, scripts/bench_onednn_prepack.py):
    prepacking takes 0.41-0.76x of the time where the weight holds at least as many elements as the input
    activation (the reorder it saves is then the larger copy), and 1.08-1.25x on large activations with
    few output channels, where oneDNN's per-call choice of layout is the better one."""
    return math.prod(int(d) for d in weight_shape) >= math.prod(int(d) for d in input_shape)


def pack_conv(w, padding, strides, dilations, groups, input_shape):
    return torch.ops.mkldnn._reorder_convolution_weight(
        w.float().contiguous(), list(padding), list(strides), list(dilations), groups, [int(d) for d in input_shape])


def conv(x, packed, b, padding, strides, dilations, groups):
    """F.conv2d(x, w, b, ...) on pack_conv's weight; the result is channels-last in memory."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, b, list(padding), list(strides), list(dilations), groups, "none", [], "")


def pack_linear(w, rows):
    """w: (out, in); rows: the input's leading dimensions multiplied (oneDNN picks the layout for them)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.float().contiguous(), int(rows))


def linear(x, packed, b=None):
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
