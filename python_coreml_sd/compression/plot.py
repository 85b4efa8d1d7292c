"""The PSNR-against-size picture of mixed-bit recipes (matplotlib when installed, else Pillow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot(curve, uniform, path, title="PSNR vs model size"):
    """PNG of PSNR against size: matplotlib when installed, else drawn with Pillow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pillow_plot(curve, uniform, path, title)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p["megabytes"] for p in curve], [_finite(p["measured_psnr"]) for p in curve], "o-", label="mixed-bit")
    ax.plot([p["megabytes"] for p in uniform], [_finite(p["measured_psnr"]) for p in uniform], "s--", label="uniform")
    ax.set_xlabel("weights (MB)"), ax.set_ylabel("output PSNR (dB)"), ax.set_title(title), ax.legend()
    fig.savefig(path, dpi=100)
    return Path(path)


def _finite(v, cap=80.0):
    return min(v, cap)


def _pillow_plot(curve, uniform, path, title):
    from PIL import Image, ImageDraw

    width, height, margin = 720, 460, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    xs = [p["megabytes"] for p in curve + uniform]
    ys = [_finite(p["measured_psnr"]) for p in curve + uniform]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys) - 2, max(ys) + 2

    def at(x, y):
        return (margin + (x - x0) / (x1 - x0 or 1) * (width - 2 * margin),
                height - margin - (y - y0) / (y1 - y0 or 1) * (height - 2 * margin))

    d.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for frac in np.linspace(0, 1, 5):
        x, y = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        d.text((at(x, y0)[0] - 12, height - margin + 6), f"{x:.2f}", fill="black")
        d.text((8, at(x0, y)[1] - 6), f"{y:.0f}", fill="black")
    for series, color, label in ((curve, "blue", "mixed-bit (greedy)"), (uniform, "red", "uniform bits")):
        pts = [at(p["megabytes"], _finite(p["measured_psnr"])) for p in sorted(series, key=lambda p: p["megabytes"])]
        d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.text((width - margin - 150, margin + 8 + 14 * (color == "red")), label, fill=color)
    d.text((margin, 20), title, fill="black")
    d.text((width // 2 - 40, height - 25), "weights (MB)", fill="black")
    d.text((8, 30), "output PSNR (dB)", fill="black")
    img.save(path)
    return Path(path)
