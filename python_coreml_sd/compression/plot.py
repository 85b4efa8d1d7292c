"""The PSNR-against-size picture of mixed-bit recipes, drawn with Pillow."""
from pathlib import Path

import numpy as np

PSNR_CAP = 80.0  # dB: an exact recipe (inf dB) is drawn at the cap


def plot(curve, uniform, path, title="PSNR vs model size"):
    """PNG of PSNR against size (MB), one line per series: the greedy mixed-bit recipes and the uniform bits."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 460, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    xs = [p["megabytes"] for p in curve + uniform]
    ys = [min(p["measured_psnr"], PSNR_CAP) for p in curve + uniform]
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
        pts = [at(p["megabytes"], min(p["measured_psnr"], PSNR_CAP))
               for p in sorted(series, key=lambda p: p["megabytes"])]
        d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.text((width - margin - 150, margin + 8 + 14 * (color == "red")), label, fill=color)
    d.text((margin, 20), title, fill="black")
    d.text((width // 2 - 40, height - 25), "weights (MB)", fill="black")
    d.text((8, 30), "output PSNR (dB)", fill="black")
    img.save(path)
    return Path(path)
