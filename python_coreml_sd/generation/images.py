"""PNG outputs: names from prompt and seed, generation parameters in text metadata, atomic writes."""
import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import UserError
from ..package_io import replace_atomically


def output_name(prompt: str, seed: int, index: int = 0) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:80] or "image"
    return f"{slug}.seed{seed}" + (f".{index}" if index else "") + ".png"


def save_png(image: Image.Image, path: Path, parameters: dict, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it or choose another -o")
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    for key, value in parameters.items():
        info.add_text(key, str(value))
    return replace_atomically(lambda tmp: image.save(tmp, format="PNG", pnginfo=info), path, overwrite)


MAX_IMAGE_SIDE = 8192  # checked on the header, before any pixel is decoded


def load_image(path, flag: str = "--image") -> Image.Image:
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise UserError(f"{flag} {path} is {image.size[0]}x{image.size[1]}; images up to "
                                f"{MAX_IMAGE_SIDE} pixels a side are read (resize it first)")
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read {flag} {path}: {exc}") from exc
