"""An fp16 VAE that does not overflow: the residual stream carried scaled by powers of two.

SDXL's VAE overflows in fp16 (NaN / black images, Apple's ml-stable-diffusion #304): its decoder's residual
stream reaches thousands, and every GroupNorm squares its input's deviations, so fp16 (max 65504) is exceeded
from |x - mean| > 256 already. Apple converts that VAE in fp32 instead; keeping chosen ops in fp32
(coremltools' FP16ComputePrecision op_selector) would mix precisions on the Neural Engine and still leave the
stream's adds and convs to choose. We rescale instead, which is exact:

- every tensor the stream carries only ever reaches a GroupNorm (each resnet's norm1, the attention's
  group_norm, conv_norm_out) or is added to the stream again, and GroupNorm(x / s) with eps / s^2 equals
  GroupNorm(x) with eps: the norms and everything after them are unchanged;
- so the stream is divided by s where it is made (conv_in: weight and bias) and where it is added to (each
  resnet's conv2 and the attention's to_out: weight and bias; a resnet's conv_shortcut reads the scaled
  stream: bias only). The stream between two up/down samplers is one segment with its own s: a sampler's
  conv takes segment k's scale to segment k+1's (weight times s_k / s_k+1, bias / s_k+1), so the small
  early stream is not pushed towards fp16's subnormals by the large late one. conv1's output only reaches
  norm2: it gets its own s (conv1's weight and bias, norm2's eps), 1 unless it too is too large;
- each s is a power of two, so dividing by it is exact in fp16 and fp32 (only the exponent changes) and the
  fp16 program computes, rounding for rounding, the unscaled program divided by s, without its overflow.
  Only values that leave fp16's normal range differ: weights under 2^-14 * s become subnormal (absolute
  error under 2^-25, far below fp16's own rounding of the weights that matter), and eps / s^2 (SDXL's 1e-6
  is already subnormal in fp16) may round to 0, which matters only for a group of constant values.

Each s is chosen from the activation range: the largest input of its GroupNorms in an fp32 forward pass on
inputs scaled like real ones (latents / scaling_factor for the decoder), kept at or under SAFE_PEAK. A VAE
that stays there (SD 1.x's random `tiny`, `tiny-xl`) is converted unchanged, byte for byte.
"""
import copy
import logging
import math

import torch

from ..errors import UserError

log = logging.getLogger("python_coreml_sd")

# Largest GroupNorm input kept after scaling: deviations then stay under 2 * 32, their squares under 2^12, 16x
# below fp16's maximum, leaving 4x in magnitude for latents that drive the VAE harder than the calibration's.
SAFE_PEAK = 32.0


def norm_input_peaks(module: torch.nn.Module, inputs: tuple) -> dict:
    """{GroupNorm: the largest |value| it sees} in an fp32 forward pass of `module` on `inputs`."""
    peaks = {}

    def record(norm, args):
        peaks[norm] = max(peaks.get(norm, 0.0), args[0].abs().max().item())
    hooks = [m.register_forward_pre_hook(record) for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def stream_scale(peak: float) -> int:
    """The smallest power of two s with peak / s <= SAFE_PEAK (1: no scaling)."""
    return 1 if peak <= SAFE_PEAK else 2 ** math.ceil(math.log2(peak / SAFE_PEAK))


def _scale(layer, factor: float, weight: bool = True) -> None:
    if weight:
        layer.weight.mul_(factor)
    if layer.bias is not None:
        layer.bias.mul_(factor)


def _norm(norm, component: str):
    if not isinstance(norm, torch.nn.GroupNorm):
        raise UserError(f"{component}: the fp16 rescaling needs GroupNorms on the VAE's residual stream, this VAE "
                        f"has {type(norm).__name__}; convert it with --compute-precision float32")
    return norm


def segments(part: torch.nn.Module, component: str) -> list:
    """The residual stream of a diffusers VAE Encoder or Decoder cut at its up/down samplers, in stream order:
    [(blocks' resnets and attentions, the sampler that ends the segment or None)]."""
    blocks = ([part.mid_block, *part.up_blocks] if hasattr(part, "up_blocks") else [*part.down_blocks, part.mid_block])
    cuts, current = [], []
    for block in blocks:
        current += [*block.resnets, *(a for a in (getattr(block, "attentions", None) or []) if a is not None)]
        for sampler in getattr(block, "upsamplers", None) or getattr(block, "downsamplers", None) or []:
            if not isinstance(getattr(sampler, "conv", None), torch.nn.Conv2d):
                raise UserError(f"{component}: the fp16 rescaling needs the VAE's samplers to be convolutions; "
                                "convert it with --compute-precision float32")
            cuts.append((current, sampler))
            current = []
    return cuts + [(current, None)]


def _stream_norms(layers: list, component: str) -> list:
    return [_norm(layer.norm1 if hasattr(layer, "norm1") else layer.group_norm, component) for layer in layers]


def plan_scales(part: torch.nn.Module, peaks: dict, component: str) -> list:
    """One power of two per segment (segments()), from the largest input of the GroupNorms reading its stream."""
    cut = segments(part, component)
    scales = [stream_scale(max((peaks.get(n, 0.0) for n in _stream_norms(layers, component)), default=0.0))
              for layers, _ in cut]
    scales[-1] = max(scales[-1], stream_scale(peaks.get(_norm(part.conv_norm_out, component), 0.0)))
    return scales


def scale_stream(part: torch.nn.Module, scales: list, peaks: dict, component: str) -> None:
    """Carry the residual stream of a diffusers VAE Encoder or Decoder (`part`) divided by `scales` (one per
    segment), and each resnet's conv1 output by its own power of two (from norm2's peak in `peaks`), in place."""
    with torch.no_grad():
        _scale(part.conv_in, 1.0 / scales[0])
        _norm(part.conv_norm_out, component).eps /= scales[-1] ** 2
        for k, (layers, sampler) in enumerate(segments(part, component)):
            s = scales[k]
            for layer in layers:
                if hasattr(layer, "norm1"):  # ResnetBlock2D
                    _norm(layer.norm1, component).eps /= s * s
                    _scale(layer.conv2, 1.0 / s)
                    if layer.conv_shortcut is not None:
                        _scale(layer.conv_shortcut, 1.0 / s, weight=False)
                    own = stream_scale(peaks.get(_norm(layer.norm2, component), 0.0))
                    _scale(layer.conv1, 1.0 / own)
                    layer.norm2.eps /= own * own
                else:  # Attention: group_norm, then to_out added to the stream
                    _norm(layer.group_norm, component).eps /= s * s
                    _scale(layer.to_out[0], 1.0 / s)
            if sampler is not None:
                layer = sampler.conv
                layer.weight.mul_(s / scales[k + 1])
                if layer.bias is not None:
                    layer.bias.div_(scales[k + 1])


def fp16_safe(module: torch.nn.Module, part_name: str, inputs: tuple, component: str):
    """`module` (VAEDecoder / VAEEncoder, whose `part_name` attribute is the diffusers Decoder / Encoder) made
    safe for fp16, and its segments' scales: itself and None when its activations fit fp16 as they are, else a
    rescaled copy, checked in fp32 against the original on `inputs`."""
    peaks = norm_input_peaks(module, inputs)
    if max(peaks.values(), default=0.0) <= SAFE_PEAK:
        return module, None
    scaled = copy.deepcopy(module)
    part = getattr(scaled, part_name)
    by_name = {n: m for n, m in module.named_modules()}
    peaks = {m: peaks[by_name[n]] for n, m in scaled.named_modules() if by_name.get(n) in peaks}
    scales = plan_scales(part, peaks, component)
    scale_stream(part, scales, peaks, component)
    with torch.no_grad():
        expected, got = module(*inputs), scaled(*inputs)
    error = (got - expected).abs().max().item()
    if not error <= 1e-4 * expected.abs().max().item():
        raise UserError(f"{component}: rescaling the VAE's residual stream changed its fp32 output (max error "
                        f"{error:.3g}): its structure is not one the rescaling knows; convert it with "
                        "--compute-precision float32")
    log.info("%s: GroupNorm inputs reach %.0f, over fp16's safe %g: residual stream divided by %s",
             component, max(peaks.values()), SAFE_PEAK, scales)
    return scaled, scales
