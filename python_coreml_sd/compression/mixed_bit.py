"""Mixed-bit palettization, the command line: per-layer sensitivity, recipes (layer -> bits), applying them.

Pre-analysis (``compression/sensitivity.py``): on the PyTorch module, palettize one layer at a time
(weights replaced by their LUT values, fp16 as on device) at each candidate bit width and measure the
output PSNR against the untouched fp32 model (``python_coreml_sd.metrics.psnr``, Apple's definition).
Candidates run in batches, each layer is clustered once per bit width, on CUDA when PyTorch sees it.

Recipe selection (``compression/search.py``): greedy, over the per-layer errors taken as independent
noise; the chosen recipe is then measured for real. The picture: ``compression/plot.py``.

Recipes (``compression/recipes.py``) name layers canonically, by the diffusers UNet's own module
paths (``down_blocks.0.resnets.0.conv1``), which the converter's MIL weights are named after.

SDXL UNets (``--model-version tiny-xl``, a local SDXL folder): the sample inputs (``testbed.unet_inputs``, batch
one) take the component table's shapes, with the added conditions ``time_ids`` and ``text_embeds`` as wide as
the model's text_encoder_2 pools; a bare SDXL UNet folder is refused (its pooled width is not in its config).

    python -m python_coreml_sd.compression.mixed_bit --model-version tiny --target-bits 3 \\
        --out recipe.json [--plot recipe.png] [--scores scores.json] [--apply SRC.mlpackage DST.mlpackage]
    python -m python_coreml_sd.torch2coreml --model-version tiny --convert-unet --mixed-bit-recipe recipe.json
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below (torch): what they warn about must not precede an error
    from python_coreml_sd.console import quiet_start
    quiet_start()

import argparse
import json
import os
import sys
import time
from pathlib import Path

from python_coreml_sd.compression.kmeans import SUPPORTED_NBITS
from python_coreml_sd.compression.plot import plot
from python_coreml_sd.compression.search import (
    CANDIDATE_BITS, DEFAULT_BATCH, apply_recipe, average_bits, choose_recipe, megabytes, predicted_psnr, sensitivity,
    tradeoff_curve, uniform_points)
from python_coreml_sd.compression.recipes import KEEP_FP16
from python_coreml_sd.compression.palettize import resolve_device
from python_coreml_sd.compression.sensitivity import Probe, ScoreFile, palettizable_layers
from python_coreml_sd.errors import UserError, first_line

PROG = "mixed_bit"
def bit_widths(text: str) -> tuple:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}, reverse=True))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of bit widths")
    if not bits or not set(bits) <= set(SUPPORTED_NBITS):
        raise argparse.ArgumentTypeError(f"bit widths must be among {', '.join(map(str, SUPPORTED_NBITS))}")
    return bits


def parser_spec() -> argparse.ArgumentParser:
    from python_coreml_sd import registry
    from python_coreml_sd.compression.testbed import UNET_CONFIGS
    from python_coreml_sd.console import OneLineErrorParser
    from python_coreml_sd.console import positive_int

    p = OneLineErrorParser(prog=PROG, description="Mixed-bit palettization pre-analysis of a UNet: writes a "
                           "recipe JSON (layer -> bits) for torch2coreml --mixed-bit-recipe, and a PSNR-vs-size plot.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model-version", help="a diffusers model folder, a Hugging Face repo id (needs the hub), or "
                      f"a registry name: {', '.join(registry.model_names())} (default: tiny); only its UNet is loaded")
    what.add_argument("--unet-dir", type=Path, help="a diffusers UNet folder (config.json and weights), or a model "
                      "folder (needed for SDXL: its text_encoder_2 gives the pooled text width)")
    what.add_argument("--config", choices=UNET_CONFIGS, help="a random-weight UNet built in memory (sd15, sdxl: "
                      "full-size SD 1.5, SDXL base), weights from --seed; nothing is written but the outputs")
    p.add_argument("--seed", type=int, default=0, help="weights of --config (default: 0)")
    p.add_argument("--target-bits", type=float, help="average bit width to reach (e.g. 2.8)")
    p.add_argument("--target-psnr", type=float, help="lowest predicted output PSNR (dB) to accept")
    p.add_argument("--bits", type=bit_widths, default=CANDIDATE_BITS,
                   help="candidate bit widths, comma-separated (default: 8,6,4,2,1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the forward passes run (default: auto, CUDA when PyTorch sees a GPU)")
    p.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH,
                   help=f"candidates per forward pass (default: {DEFAULT_BATCH})")
    p.add_argument("--workers", type=positive_int, help="worker processes (default: one per CPU core)")
    p.add_argument("--max-memory", type=float, metavar="GB",
                   help="peak memory the CPU pre-analysis may take, in GB (default: what this machine has "
                        "available); it measures one forward pass, then uses smaller batches, then fewer "
                        "workers, until its estimate fits")
    p.add_argument("--out", type=Path, required=True, help="recipe JSON to write")
    p.add_argument("--scores", type=Path, metavar="FILE",
                   help="keep each layer's scores in this JSON file as they are measured; a later run on the same "
                        "model and sample inputs (after an interruption, or for another target) reads them instead "
                        "of measuring again, on either device")
    p.add_argument("--plot", type=Path, help="PNG of PSNR vs model size (measures 16 more recipes)")
    p.add_argument("--apply", nargs=2, type=Path, metavar=("SRC", "DST"),
                   help="also palettize SRC.mlpackage into DST with the recipe")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--verbose", action="store_true", help="show the log of torch and diffusers")
    return p


def main(argv=None) -> int:
    from python_coreml_sd.console import quiet_third_party, run_cli

    args = parser_spec().parse_args(argv)
    quiet_third_party(args.verbose, converters=bool(args.apply))  # coremltools only for --apply

    def body() -> int:
        check_args(args)
        run(args)
        return 0
    return run_cli(PROG, body)

def check_args(args) -> None:
    """Everything that can be checked before the analysis: one UserError, nothing written."""
    if args.target_bits is None and args.target_psnr is None:
        raise UserError("give --target-bits and/or --target-psnr")
    if args.target_bits is not None and not 1 <= args.target_bits <= KEEP_FP16:
        raise UserError(f"--target-bits must be between 1 and {KEEP_FP16}, got {args.target_bits:g}")
    if args.max_memory is not None and not args.max_memory > 0:
        raise UserError(f"--max-memory must be a positive number of GB, got {args.max_memory:g}")
    if args.scores is not None:
        _check_writable_file("--scores", args.scores)
        if args.scores.exists():
            ScoreFile.read(args.scores)  # a broken file fails here, before the model loads
    outputs = [("--out", args.out), ("--plot", args.plot)] + ([("--apply DST", args.apply[1])] if args.apply else [])
    for flag, path in outputs:
        if path is not None:
            _check_output(flag, path, args.overwrite)
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UserError(f"--plot {args.plot}: the plot is a PNG; name it *.png")
    if args.apply:
        _check_package(*args.apply)
    args.device = resolve_device(args.device)


def _check_output(flag: str, path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir() and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it")
    _check_writable_file(flag, path)


def _check_writable_file(flag: str, path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path")
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: folder {parent} does not exist or is not writable")


def _check_package(src: Path, dst: Path) -> None:
    if not (src / "Manifest.json").is_file():
        raise UserError(f"--apply {src} is not an .mlpackage (no Manifest.json)")
    from python_coreml_sd.package_check import check_package
    check_package(src)
    if src.resolve() == dst.resolve():
        raise UserError("--apply SRC and DST must differ")


def load_subject(args):
    """(name, wrapped UNet, batch-1 inputs, {canonical layer name: layer}) for the CLI's model."""
    from python_coreml_sd.compression import testbed
    from python_coreml_sd.layers.unet import DiffusersUNet

    if args.config:
        model, inputs = testbed.unet(args.config, args.seed)
        return f"{args.config} (random weights, seed {args.seed})", model, inputs, palettizable_layers(model.unet)
    name, unet, length, pooled = _load_unet(args)
    model = DiffusersUNet(unet.requires_grad_(False)).eval()
    return name, model, testbed.unet_inputs(unet.config, length, text_pooled=pooled), palettizable_layers(unet)


def _load_unet(args):
    """(name, diffusers UNet, text sequence length, pooled text width or None) for --model-version or --unet-dir."""
    from python_coreml_sd.components import SDXL, interface_of, text_pooled_width
    from python_coreml_sd.model_sources import resolve

    unet_dir = args.unet_dir
    if unet_dir is not None and not (unet_dir / "model_index.json").is_file():
        unet = _unet_from_folder(unet_dir)
        if interface_of(dict(unet.config)) == SDXL:  # its added embeddings' width mixes pooled width and time ids
            raise UserError(f"--unet-dir {unet_dir} is an SDXL UNet: give its model folder (the one with "
                            "model_index.json), whose text_encoder_2 sets the pooled text embeddings' width")
        return str(unet_dir), unet, 77, None
    source = resolve(str(unet_dir) if unet_dir is not None else args.model_version or "tiny")
    return source.name, source.load_unet(), source.text_positions(), text_pooled_width(source)


def _unet_from_folder(path: Path):
    if not (path / "config.json").is_file():
        raise UserError(f"--unet-dir {path} is not a diffusers UNet folder (no config.json) nor a model folder "
                        "(no model_index.json)")
    from diffusers import UNet2DConditionModel

    from python_coreml_sd.weights import refuse_pickles
    refuse_pickles(path)
    try:
        return UNet2DConditionModel.from_pretrained(str(path), use_safetensors=True).eval()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load the UNet in {path}: {first_line(exc)}") from exc


def run(args) -> dict:
    """Analyse, choose, measure and write; returns the recipe document."""
    from python_coreml_sd.package_io import replace_atomically
    start = time.perf_counter()
    name, module, inputs, layers = load_subject(args)
    _progress(f"model: {name}, {len(layers)} palettizable layers, loaded in {time.perf_counter() - start:.1f} s")
    probe = Probe(module, inputs, layers, args.bits, args.batch)
    start = time.perf_counter()
    max_memory = None if args.max_memory is None else int(args.max_memory * 1e9)
    analysis = sensitivity(probe, args.device, args.workers, log=_progress, max_memory=max_memory,
                           score_file=args.scores)
    seconds = time.perf_counter() - start
    print(f"pre-analysis: {len(layers)} layers x {len(args.bits)} bit widths in {seconds:.1f} s "
          f"({args.device}, batch {probe.batch})", flush=True)
    doc = recipe_document(probe, analysis, args, name, seconds)
    if args.plot:
        doc["curve"], doc["uniform"] = tradeoff_curve(probe, analysis), uniform_points(probe, analysis, args.bits)
    replace_atomically(lambda tmp: tmp.write_text(json.dumps(doc, indent=2, default=float)), args.out, args.overwrite)
    print(f"recipe: {doc['average_bits']:.2f} bits average, {doc['megabytes']:.2f} MB (fp16 {doc['fp16_megabytes']:.2f} "
          f"MB), PSNR predicted {doc['predicted_psnr']:.1f} / measured {doc['measured_psnr']:.1f} dB -> {args.out}")
    if args.plot:
        title = f"{name} UNet: output PSNR vs weight size"
        replace_atomically(lambda tmp: plot(doc["curve"], doc["uniform"], tmp, title=title), args.plot, args.overwrite)
        print(f"plot -> {args.plot}")
    if args.apply:
        print(f"palettized with the recipe -> {apply_recipe(*args.apply, doc['layers'], overwrite=args.overwrite)}")
    return doc


def recipe_document(probe: Probe, analysis, args, name: str, seconds: float) -> dict:
    recipe = choose_recipe(analysis, args.target_bits, args.target_psnr)
    return {"layers": recipe, "model": name, "average_bits": average_bits(analysis, recipe),
            "predicted_psnr": predicted_psnr(analysis, recipe), "measured_psnr": probe.measure([recipe])[0],
            "megabytes": megabytes(probe, recipe), "fp16_megabytes": megabytes(probe, {}),
            "target_bits": args.target_bits, "target_psnr": args.target_psnr, "candidate_bits": list(args.bits),
            "analysis_seconds": seconds, "device": args.device,
            "sensitivity": {n: {str(b): v for b, v in l["psnr"].items()} for n, l in analysis["layers"].items()}}


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
