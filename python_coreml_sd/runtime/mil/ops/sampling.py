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


_BOX_ORDER = {"CORNERS_HEIGHT_FIRST": (0, 1, 2, 3), "CORNERS_WIDTH_FIRST": (1, 0, 3, 2)}


@op("crop_resize")
def _crop_resize(a):
    # TensorFlow's crop_and_resize, as coremltools' expected values show: T samples from box start to
    # end inclusive (ALIGN_CORNERS; one sample: the box centre), bilinear, and a sample outside the
    # image takes pad_value whole. Verified only for corner boxes with (STRICT_)ALIGN_CORNERS, so the
    # other sampling modes, centre-size boxes and normalized boxes with a spatial scale are refused.
    th, tw = int(a.scalar("target_height", 1)), int(a.scalar("target_width", 1))
    normalized = bool(a.scalar("normalized_coordinates", False))
    scale = float(a.scalar("spatial_scale", 1.0))
    order = _BOX_ORDER.get(str(a.scalar("box_coordinate_mode", "CORNERS_HEIGHT_FIRST")))
    sampling = str(a.scalar("sampling_mode", "DEFAULT"))
    pad = float(a.scalar("pad_value", 0.0))  # iOS16+; the iOS15 op has none, iOS16's default is 0
    if order is None or sampling not in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS") or (normalized and scale != 1.0):
        raise ValueError(f"sampling_mode {sampling!r}, box mode {a.scalar('box_coordinate_mode', 'CORNERS_HEIGHT_FIRST')!r}: "
                         "only corner boxes with ALIGN_CORNERS / STRICT_ALIGN_CORNERS sampling (and no spatial "
                         "scale on normalized boxes) have established semantics (docs/runtime.md)")
    n_img, _, h, w = a.in_shape()
    dev = a.device

    def axis(start, end, t):
        if t == 1:
            return ((start + end) / 2 if sampling == "ALIGN_CORNERS" else start).unsqueeze(-1)
        return start.unsqueeze(-1) + torch.linspace(0, 1, t, dtype=torch.float64, device=dev) * (end - start).unsqueeze(-1)

    def crop(x, boxes, index):
        b = boxes.to(torch.float64).reshape(-1, 4)[:, list(order)] * scale
        if normalized:
            b = b * torch.tensor([h - 1, w - 1, h - 1, w - 1], dtype=torch.float64, device=dev)
        py = axis(b[:, 0], b[:, 2], th).unsqueeze(-1).expand(-1, th, tw)
        px = axis(b[:, 1], b[:, 3], tw).unsqueeze(-2).expand(-1, th, tw)
        out = sample(x[index], px, py, "bilinear", "border", pad)
        outside = (py < 0) | (py > h - 1) | (px < 0) | (px > w - 1)
        return torch.where(outside.unsqueeze(1), torch.full_like(out, pad), out)

    if a.has("boxes"):  # iOS17: boxes (N, 4), box_indices (N,) defaulting to 0..N-1; out (N, C, th, tw)
        if a.has("box_indices"):
            return (lambda x, boxes, idx: crop(x, boxes, idx.long())), [a.var("x"), a.var("boxes"), a.var("box_indices")]
        return (lambda x, boxes: crop(x, boxes, torch.arange(boxes.shape[0], device=dev))), [a.var("x"), a.var("boxes")]

    # iOS15/16 roi (N, 1, 4 or 5, 1, 1): with 5, the first is the image index, out (N, 1, C, th, tw);
    # with 4, each box crops every image, out (N, B, C, th, tw).
    if a.in_shape("roi")[2] == 5:
        def fn(x, roi):
            r = roi.reshape(-1, 5)
            return crop(x, r[:, 1:], r[:, 0].round().long()).unsqueeze(1)
    else:
        def fn(x, roi):
            r = roi.reshape(-1, 4)
            n = r.shape[0]
            boxes = r.repeat_interleave(n_img, 0)
            index = torch.arange(n_img, device=dev).repeat(n)
            out = crop(x, boxes, index)
            return out.reshape((n, n_img) + tuple(out.shape[1:]))

    return fn, [a.var("x"), a.var("roi")]
