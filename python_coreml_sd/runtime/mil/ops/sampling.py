"""resample and affine: sampling an image at per-pixel coordinates.

Written out with gathers rather than grid_sample, so every padding mode is the MIL reference's own:
each neighbour's integer index is mapped through the padding (reflection excludes the edge pixel,
symmetric repeats it, constant masks in `padding_value`), then blended. Nearest picks floor(p + 0.5).
Checked against coremltools' expected values for all four padding modes.
"""
import torch

from .registry import op


def _pixel(coord, size, mode, align):
    """Normalized (or pixel) coordinates -> continuous pixel positions along one axis."""
    if mode == "unnormalized":
        return coord
    if mode == "normalized_minus_one_to_one":
        return (coord + 1) / 2 * (size - 1) if align else ((coord + 1) * size - 1) / 2
    if mode == "normalized_zero_to_one":
        return coord * (size - 1) if align else coord * size - 0.5
    raise ValueError(f"coordinates_mode {mode!r} is not in the MIL op reference")


def _map_index(i, size, padding):
    """(index into the axis, inside?) for integer positions `i` under a padding mode."""
    if padding == "constant":
        return i.clamp(0, size - 1), (i >= 0) & (i < size)
    if padding == "border":
        return i.clamp(0, size - 1), None
    if padding == "reflection":  # |1 2 3| -> 2 3 2 1 2 3 2 1 2: period 2(n-1)
        if size == 1:
            return torch.zeros_like(i), None
        m = i.remainder(2 * (size - 1))
        return torch.where(m >= size, 2 * (size - 1) - m, m), None
    if padding == "symmetric":  # |1 2 3| -> 3 2 1 1 2 3 3 2 1: period 2n
        m = i.remainder(2 * size)
        return torch.where(m >= size, 2 * size - 1 - m, m), None
    raise ValueError(f"padding_mode {padding!r} is not in the MIL op reference")


def sample(x, px, py, sampling, padding, pad_value):
    """x (B, C, H, W) at pixel positions px, py (B, H2, W2) -> (B, C, H2, W2)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)

    def at(iy, ix):
        (ry, in_y), (rx, in_x) = _map_index(iy, h, padding), _map_index(ix, w, padding)
        idx = (ry * w + rx).reshape(b, 1, -1).expand(b, c, -1)
        v = torch.gather(flat, 2, idx).reshape(b, c, *px.shape[1:])
        if in_y is not None:
            v = torch.where((in_y & in_x).unsqueeze(1), v, torch.full_like(v, pad_value))
        return v

    if sampling == "nearest":
        return at(torch.floor(py + 0.5).long(), torch.floor(px + 0.5).long())
    if sampling != "bilinear":
        raise ValueError(f"sampling_mode {sampling!r} is not in the MIL op reference")
    x0, y0 = torch.floor(px), torch.floor(py)
    fx, fy = (px - x0).unsqueeze(1).to(x.dtype), (py - y0).unsqueeze(1).to(x.dtype)
    x0, y0 = x0.long(), y0.long()
    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _modes(a):
    return (str(a.scalar("sampling_mode")).lower(), str(a.scalar("padding_mode")).lower(),
            float(a.scalar("padding_value")), str(a.scalar("coordinates_mode")).lower(),
            bool(a.scalar("align_corners")))


@op("resample")
def _resample(a):
    sampling, padding, value, cmode, align = _modes(a)
    h, w = a.in_shape()[-2:]

    def fn(x, coords):
        coords = coords.to(torch.float64)  # int32 coordinates are allowed; float64 keeps fp32 exact
        px, py = _pixel(coords[..., 0], w, cmode, align), _pixel(coords[..., 1], h, cmode, align)
        return sample(x, px, py, sampling, padding, value)

    return fn, [a.var("x"), a.var("coordinates")]


@op("affine")
def _affine(a):
    # Output pixel (h, w) sits at normalized (x, y) in [-1, 1] (align_corners: corners at the ends);
    # (x', y') = (a0 x + a1 y + a2, b0 x + b1 y + b2) is then sampled like resample does.
    sampling, padding, value, cmode, align = _modes(a)
    oh, ow = int(a.scalar("output_height")), int(a.scalar("output_width"))
    if not align or cmode != "normalized_minus_one_to_one" or min(oh, ow) < 2:
        raise ValueError("only align_corners with normalized_minus_one_to_one coordinates and outputs of "
                         "2 pixels or more are specified")
    h, w = a.in_shape()[-2:]
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, oh, dtype=torch.float64, device=a.device),
                            torch.linspace(-1, 1, ow, dtype=torch.float64, device=a.device), indexing="ij")

    def fn(x, m):
        m = m.to(torch.float64).reshape(-1, 6, 1, 1).expand(x.shape[0], 6, 1, 1)
        xs = m[:, 0] * gx + m[:, 1] * gy + m[:, 2]
        ys = m[:, 3] * gx + m[:, 4] * gy + m[:, 5]
        return sample(x, _pixel(xs, w, cmode, align), _pixel(ys, h, cmode, align), sampling, padding, value)

    return fn, [a.var("x"), a.var("transform_matrix")]
