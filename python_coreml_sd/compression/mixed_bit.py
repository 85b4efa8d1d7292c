"""Mixed-bit palettization: per-layer sensitivity, recipes (layer -> bits), and applying them.

Pre-analysis: on the PyTorch module, palettize one layer at a time (weights replaced by their LUT
values, fp16 as on device) at each bit width and measure the output PSNR against the untouched
fp32 model (``python_coreml_sd.metrics.psnr``, Apple's definition).

Recipe selection: treat each layer's output error as independent noise, so the mean squared
errors add: predicted PSNR = 20 log10(peak / sqrt(sum of per-layer MSEs)). Starting from fp16
everywhere, greedily lower the bit width of the layer whose next step costs the least MSE per bit
saved, until the average bit width reaches the target (or the next step would fall under the
target PSNR). The chosen recipe is then measured for real, all layers at once.

Recipe JSON: ``{"layers": {"down_blocks.0.resnets.0.conv1": 4, ...}, ...metadata}``; 16 means
"keep fp16". Layer names are PyTorch module paths. Name mapping to MIL (``recipe_to_const_names``):
coremltools names a traced module's weight const ``<path with dots as underscores>_weight`` plus a
cast suffix (``_to_fp16``) and any wrapper prefix (``unet_``). A recipe key matches the const whose
name, minus the cast suffix, equals ``<key with _>_weight`` or ends with ``_`` + that (the longest
key wins); a key may also be a MIL const name verbatim. Keys matching nothing are an error.

    python -m python_coreml_sd.compression.mixed_bit --config tiny --target-bits 3 \
        --out recipe.json --plot recipe.png [--apply SRC.mlpackage DST.mlpackage]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from python_coreml_sd.compression.kmeans import palettize_array
from python_coreml_sd.compression.palettize import KEEP_FP16, WEIGHT_THRESHOLD
from python_coreml_sd.errors import UserError
from python_coreml_sd.metrics import psnr

CANDIDATE_BITS = (8, 6, 4, 2, 1)
CAST_SUFFIXES = ("_to_fp16", "_to_fp32")


def palettizable_layers(module, threshold: int = WEIGHT_THRESHOLD) -> dict:
    """{module path: layer} for conv/linear layers whose weight coremltools would palettize."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Conv1d)) and m.weight.numel() > threshold}


def fake_palettized(weight: torch.Tensor, nbits: int) -> torch.Tensor:
    """The weight as the palettized model will hold it: fp16, snapped to its nbits LUT."""
    w16 = weight.detach().to(torch.float16).cpu().numpy()
    lut, indices = palettize_array(w16, nbits)
    return torch.from_numpy(lut[indices].astype(np.float32)).to(weight.dtype)


def _forward(module, inputs) -> np.ndarray:
    with torch.no_grad():
        return module(*inputs.values()).float().numpy()


def layer_sensitivity(module, inputs, bits=CANDIDATE_BITS, threshold: int = WEIGHT_THRESHOLD, log=print,
                      cache: dict | None = None) -> dict:
    """{"reference_peak": .., "layers": {name: {"params": n, "psnr": {bits: dB}}}}, one layer at a time."""
    reference = _forward(module, inputs)
    layers = {}
    for i, (name, layer) in enumerate(palettizable_layers(module, threshold).items()):
        original = layer.weight.data.clone()
        scores = {}
        for b in bits:
            layer.weight.data = fake_palettized(original, b)
            if cache is not None:
                cache[(name, b)] = layer.weight.data
            scores[b] = psnr(reference, _forward(module, inputs))
        layer.weight.data = original
        layers[name] = {"params": int(original.numel()), "psnr": scores}
        if log:
            log(f"[{i + 1}] {name}: " + ", ".join(f"{b}b {s:.1f}" for b, s in scores.items()))
    return {"reference_peak": float(np.abs(reference).max()), "layers": layers}


def _mse(peak, db):
    return 0.0 if db == float("inf") else peak * peak * 10 ** (-db / 10)


def predicted_psnr(analysis, recipe) -> float:
    peak = analysis["reference_peak"]
    total = sum(_mse(peak, analysis["layers"][n]["psnr"][b]) for n, b in recipe.items() if b != KEEP_FP16)
    return float("inf") if total == 0 else float(20 * np.log10(peak / np.sqrt(total)))


def average_bits(analysis, recipe) -> float:
    layers = analysis["layers"]
    total = sum(l["params"] for l in layers.values())
    return sum(recipe[n] * layers[n]["params"] for n in layers) / total


def choose_recipe(analysis, target_bits: float | None = None, target_psnr: float | None = None) -> dict:
    """Greedy recipe for a target average bit width and/or a target (predicted) PSNR."""
    if target_bits is None and target_psnr is None:
        raise UserError("mixed-bit: give a target average bit width, a target PSNR, or both")
    layers, peak = analysis["layers"], analysis["reference_peak"]
    steps = (KEEP_FP16,) + tuple(sorted({int(b) for l in layers.values() for b in l["psnr"]}, reverse=True))
    recipe = {n: KEEP_FP16 for n in layers}
    noise = {n: 0.0 for n in layers}
    while target_bits is None or average_bits(analysis, recipe) > target_bits:
        move = _cheapest_step(layers, peak, recipe, noise, steps)
        if move is None:
            break
        name, bits, mse = move
        if target_psnr is not None:
            total = sum(noise.values()) - noise[name] + mse
            if total > 0 and 20 * np.log10(peak / np.sqrt(total)) < target_psnr:
                break
        recipe[name], noise[name] = bits, mse
    return recipe


def _cheapest_step(layers, peak, recipe, noise, steps):
    best = None
    for name, layer in layers.items():
        i = steps.index(recipe[name])
        if i + 1 >= len(steps):
            continue
        bits = steps[i + 1]
        mse = _mse(peak, layer["psnr"][bits])
        cost = (mse - noise[name]) / ((recipe[name] - bits) * layer["params"])
        if best is None or cost < best[0]:
            best = (cost, name, bits, mse)
    return None if best is None else best[1:]


def apply_to_module(module, recipe, cache: dict | None = None):
    """Replace each recipe layer's weight by its palettized values, in place (for measuring).

    ``cache`` ((name, bits) -> tensor) spares re-clustering when many recipes are measured.
    """
    layers = dict(module.named_modules())
    cache = {} if cache is None else cache
    for name, bits in recipe.items():
        if bits != KEEP_FP16:
            if (name, bits) not in cache:
                cache[(name, bits)] = fake_palettized(layers[name].weight.data, bits)
            layers[name].weight.data = cache[(name, bits)]


def measure_recipe(module, inputs, recipe, cache: dict | None = None) -> float:
    """Output PSNR of the whole recipe at once, against the untouched module."""
    reference = _forward(module, inputs)
    saved = {n: m.weight.data.clone() for n, m in palettizable_layers(module).items()}
    try:
        apply_to_module(module, recipe, cache)
        return psnr(reference, _forward(module, inputs))
    finally:
        layers = dict(module.named_modules())
        for n, w in saved.items():
            layers[n].weight.data = w


def model_bytes(module, recipe) -> float:
    """Weight bytes with the recipe: palettized layers at bits/8 plus their LUTs, the rest fp16."""
    total = sum(p.numel() for p in module.parameters()) * 2.0
    layers = dict(module.named_modules())
    for name, bits in recipe.items():
        if bits != KEEP_FP16:
            n = layers[name].weight.numel()
            total -= n * (2 - bits / 8) - 2 * (1 << bits)
    return total


def recipe_layers(recipe) -> dict:
    """Accepts a recipe file's dict (with "layers") or a plain {name: bits} mapping."""
    layers = recipe.get("layers", recipe) if isinstance(recipe, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(b, int) for b in layers.values()):
        raise UserError("a mixed-bit recipe is a JSON object {layer name: bits} (or {\"layers\": {...}})")
    return layers


def recipe_to_const_names(mlmodel, recipe) -> dict:
    """{MIL const name: bits} for a recipe keyed by PyTorch module paths (or const names)."""
    from python_coreml_sd.compression.palettize import mil_program

    layers = recipe_layers(recipe)
    consts = [op.name for f in mil_program(mlmodel).functions.values() for op in f.operations if op.op_type == "const"]
    out, used = {}, set()
    for const in consts:
        key = _match(const, layers)
        if key is not None:
            out[const] = layers[key]
            used.add(key)
    missing = sorted(set(layers) - used)
    if missing:
        raise UserError(f"mixed-bit recipe names {len(missing)} layer(s) not in the model, e.g. {missing[:3]}")
    return out


def _match(const, layers):
    if const in layers:
        return const
    stem = const
    for suffix in CAST_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    best = None
    for key in layers:
        target = key.replace(".", "_") + "_weight"
        if (stem == target or stem.endswith("_" + target)) and (best is None or len(key) > len(best)):
            best = key
    return best


def load_recipe(path) -> dict:
    try:
        return recipe_layers(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read mixed-bit recipe {path}: {err}") from err


def apply_recipe(src, dst, recipe, overwrite: bool = False, granularity: str = "per_tensor", group_size: int = 32):
    """Palettize ``src`` into ``dst`` with a recipe (dict or JSON path); unlisted layers stay fp16."""
    from python_coreml_sd.compression.palettize import palettize_mlpackage

    layers = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe_layers(recipe)
    return palettize_mlpackage(src, dst, None, granularity, group_size, recipe=layers, overwrite=overwrite)


def tradeoff_curve(module, inputs, analysis, targets=(16, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1),
                   cache: dict | None = None) -> list:
    """(target bits, avg bits, MB, measured PSNR) for greedy recipes over a range of targets."""
    points, cache = [], {} if cache is None else cache
    for t in targets:
        recipe = choose_recipe(analysis, target_bits=t)
        points.append({"target_bits": t, "average_bits": average_bits(analysis, recipe),
                       "megabytes": model_bytes(module, recipe) / 1e6,
                       "measured_psnr": measure_recipe(module, inputs, recipe, cache),
                       "predicted_psnr": predicted_psnr(analysis, recipe)})
    return points


def uniform_points(module, inputs, analysis, bits=CANDIDATE_BITS, cache: dict | None = None) -> list:
    points = []
    for b in bits:
        recipe = {n: b for n in analysis["layers"]}
        points.append({"bits": b, "megabytes": model_bytes(module, recipe) / 1e6,
                       "measured_psnr": measure_recipe(module, inputs, recipe, cache)})
    return points


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


def _module_for(args):
    from python_coreml_sd.compression import testbed

    if args.unet_dir:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(args.unet_dir).eval()
        model, inputs = testbed.unet("tiny")
        model.unet = unet
        _, inputs = _inputs_like(unet)
        return model, inputs
    return testbed.unet(args.config, args.seed)


def _inputs_like(unet):
    from collections import OrderedDict

    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    return None, OrderedDict(
        sample=torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim, generator=g))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m python_coreml_sd.compression.mixed_bit",
                                description="Mixed-bit palettization pre-analysis: writes a recipe JSON and a PSNR-vs-size plot.")
    p.add_argument("--config", choices=("tiny", "sd15"), default="tiny", help="random-weight UNet to analyse")
    p.add_argument("--unet-dir", help="analyse this diffusers UNet folder instead of --config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-bits", type=float, help="average bit width to reach (e.g. 2.8)")
    p.add_argument("--target-psnr", type=float, help="lowest predicted output PSNR (dB) to accept")
    p.add_argument("--out", type=Path, required=True, help="recipe JSON to write")
    p.add_argument("--plot", type=Path, help="PNG of PSNR vs model size")
    p.add_argument("--apply", nargs=2, metavar=("SRC", "DST"), help="also palettize SRC.mlpackage into DST with the recipe")
    args = p.parse_args(argv)
    if args.target_bits is None and args.target_psnr is None:
        p.error("give --target-bits and/or --target-psnr")
    try:
        run(args)
    except UserError as err:
        raise SystemExit(f"error: {err}")


def run(args):
    module, inputs = _module_for(args)
    cache = {}
    analysis = layer_sensitivity(module, inputs, cache=cache)
    recipe = choose_recipe(analysis, args.target_bits, args.target_psnr)
    doc = {"layers": recipe, "average_bits": average_bits(analysis, recipe),
           "predicted_psnr": predicted_psnr(analysis, recipe), "measured_psnr": measure_recipe(module, inputs, recipe, cache),
           "megabytes": model_bytes(module, recipe) / 1e6, "fp16_megabytes": model_bytes(module, {}) / 1e6,
           "target_bits": args.target_bits, "target_psnr": args.target_psnr,
           "sensitivity": {n: {str(b): v for b, v in l["psnr"].items()} for n, l in analysis["layers"].items()}}
    args.out.write_text(json.dumps(doc, indent=2, default=float))
    print(f"recipe: {doc['average_bits']:.2f} bits average, {doc['megabytes']:.2f} MB "
          f"(fp16 {doc['fp16_megabytes']:.2f} MB), PSNR predicted {doc['predicted_psnr']:.1f} / "
          f"measured {doc['measured_psnr']:.1f} dB -> {args.out}")
    if args.plot:
        curve = tradeoff_curve(module, inputs, analysis, cache=cache)
        uniform = uniform_points(module, inputs, analysis, cache=cache)
        doc["curve"], doc["uniform"] = curve, uniform
        args.out.write_text(json.dumps(doc, indent=2, default=float))
        plot(curve, uniform, args.plot,
             title=f"{args.unet_dir or args.config} UNet: output PSNR vs weight size")
        print(f"plot -> {args.plot}")
    if args.apply:
        dst = apply_recipe(args.apply[0], args.apply[1], recipe)
        print(f"palettized with the recipe -> {dst}")


if __name__ == "__main__":
    main()
