"""Mixed-bit recipe search over a sensitivity analysis (``sensitivity.py``).

Each layer's output error is treated as independent noise, so the mean squared errors add: predicted
PSNR = 20 log10(peak / sqrt(sum of per-layer MSEs)). Starting from fp16 everywhere, the search greedily
lowers the bit width of the layer whose next step costs the least MSE per bit saved, until the average
bit width reaches the target (or the next step would fall under the target PSNR). The chosen recipe is
then measured for real, all layers at once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from python_coreml_sd.compression.palettize import WEIGHT_THRESHOLD
from python_coreml_sd.compression.recipes import KEEP_FP16, load_recipe, recipe_layers
from python_coreml_sd.compression.sensitivity import Probe, analyse, palettizable_layers
from python_coreml_sd.errors import UserError

CANDIDATE_BITS = (8, 6, 4, 2, 1)
DEFAULT_BATCH = 16


def make_probe(module, inputs, layers: dict | None = None, bits=CANDIDATE_BITS, batch: int = DEFAULT_BATCH,
               threshold: int = WEIGHT_THRESHOLD) -> Probe:
    """What the analysis and the measurements run on; ``layers`` (name -> layer) default to the
    module's palettizable layers under their paths in ``module``."""
    return Probe(module, inputs, palettizable_layers(module, threshold) if layers is None else layers, bits, batch)


def sensitivity(probe: Probe, device: str = "cpu", workers: int | None = None, log=print,
                max_memory: int | None = None, score_file: Path | None = None) -> dict:
    """{"reference_peak": .., "layers": {name: {"params": n, "psnr": {bits: dB}}}}."""
    scores = analyse(probe, device, workers, log, max_memory=max_memory, score_file=score_file)
    return {"reference_peak": float(np.abs(probe.reference).max()),
            "layers": {n: {"params": int(probe.layers[n].weight.numel()), "psnr": scores[n]} for n in scores}}


def layer_sensitivity(module, inputs, bits=CANDIDATE_BITS, threshold: int = WEIGHT_THRESHOLD, log=print,
                      device: str = "cpu", workers: int | None = None) -> dict:
    """``sensitivity`` of a module's palettizable layers, named by their paths in ``module``."""
    return sensitivity(make_probe(module, inputs, bits=bits, threshold=threshold), device, workers, log)


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


def measure_recipe(module, inputs, recipe, probe: Probe | None = None) -> float:
    """Output PSNR of the whole recipe at once, against the untouched module (whose weights are never
    modified: the palettized ones are swapped in by forward hooks)."""
    probe = probe or make_probe(module, inputs, bits=())
    return probe.measure([recipe])[0]


def model_bytes(module, recipe, layers: dict | None = None) -> float:
    """Weight bytes with the recipe: palettized layers at bits/8 plus their LUTs, the rest fp16."""
    total = sum(p.numel() for p in module.parameters()) * 2.0
    layers = dict(module.named_modules()) if layers is None else layers
    for name, bits in recipe.items():
        if bits != KEEP_FP16:
            n = layers[name].weight.numel()
            total -= n * (2 - bits / 8) - 2 * (1 << bits)
    return total


def apply_recipe(src, dst, recipe, overwrite: bool = False, granularity: str = "per_tensor", group_size: int = 32):
    """Palettize ``src`` into ``dst`` with a recipe (dict or JSON path); unlisted layers stay fp16."""
    from python_coreml_sd.compression.palettize import palettize_mlpackage

    layers = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe_layers(recipe)
    return palettize_mlpackage(src, dst, None, granularity, group_size, recipe=layers, overwrite=overwrite)


def tradeoff_curve(probe: Probe, analysis, targets=(16, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1)) -> list:
    """(target bits, avg bits, MB, measured and predicted PSNR) for greedy recipes over a range of
    targets, measured in one batch."""
    recipes = [choose_recipe(analysis, target_bits=t) for t in targets]
    return [{"target_bits": t, "average_bits": average_bits(analysis, r), "megabytes": megabytes(probe, r),
             "measured_psnr": m, "predicted_psnr": predicted_psnr(analysis, r)}
            for t, r, m in zip(targets, recipes, probe.measure(recipes))]


def uniform_points(probe: Probe, analysis, bits=CANDIDATE_BITS) -> list:
    recipes = [{n: b for n in analysis["layers"]} for b in bits]
    return [{"bits": b, "megabytes": megabytes(probe, r), "measured_psnr": m}
            for b, r, m in zip(bits, recipes, probe.measure(recipes))]


def megabytes(probe: Probe, recipe) -> float:
    return model_bytes(probe.module, recipe, probe.layers) / 1e6
