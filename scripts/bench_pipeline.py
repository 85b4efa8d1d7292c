#!/usr/bin/env python
"""Seconds per image: the reference `torch` backend (the original diffusers modules) against the `mil`
backend (our MIL runtime on the packages our converter makes of those same modules), same model, prompt,
seed and scheduler, in one run. Prints a table.

    python scripts/bench_pipeline.py --family sd1 --device cuda --steps 50     # full-size SD 1.5, 512x512
    python scripts/bench_pipeline.py --family tiny --device cpu --steps 10

Same work on both sides: text encoder, UNet (batch 2, classifier-free guidance), VAE decoder and, by
default, the safety checker (--no-safety-checker: neither side runs it). The mil side runs packages that
python_coreml_sd.convert.convert made of exactly the modules the torch side runs (the family's
architecture with random weights, seed 0, built once into --work-dir; conversion cached there too).

Rows:
  torch eager                          diffusers modules, fp16 on CUDA (fp32 on CPU)
  torch, UNet torch.compile + CUDA graph   the same, with the UNet (the loop's cost) compiled (default mode)
                                       and replayed as a CUDA graph; on CPU torch.compile alone. If that
                                       fails on CUDA the row falls back to eager + CUDA graph and says so.
  mil                                  the converted fp16 packages; on CUDA the UNet replays as a CUDA graph
  mil, UNet torch.compile              the same with the pipeline's --torch-compile (the MIL runtime's UNet
                                       under torch.compile, then the CUDA graph on CUDA)
Each row: one 2-step warm-up image (compilation, graph capture, lazy init; reported as "warm-up s"), then
--repeat timed images, made in interleaved rounds (one image of every row per round; all rows' models are
held at once), median shown.
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a photo of an astronaut riding a horse on mars"


def prepare(family: str, work_dir: Path, attention: str, safety_checker: bool):
    os.environ["PYTHON_COREML_SD_CACHE"] = str(work_dir / "models")
    from python_coreml_sd.convert import ConversionOptions
    from python_coreml_sd.random_models import materialized_model_dir
    from python_coreml_sd.convert import convert

    start = time.perf_counter()
    folder = materialized_model_dir(family)
    print(f"model folder: {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
    out = work_dir / f"{family}-{attention.lower()}"
    components = ["text_encoder", "unet", "vae_decoder"] + (["safety_checker"] if safety_checker else [])
    start = time.perf_counter()
    convert(ConversionOptions(str(folder), out, attention_implementation=attention), components)
    print(f"converted {', '.join(components)} into {out} ({time.perf_counter() - start:.0f} s; "
          "existing packages are reused)", flush=True)
    return folder, out


def torch_models(folder, models_dir, device, precision, safety_checker):
    from python_coreml_sd.generation.components import load_torch
    from python_coreml_sd.generation.setup import _converted_shapes
    from python_coreml_sd.model_sources import resolve
    import torch

    source = resolve(str(folder))
    dtype = {"float32": torch.float32, "float16": torch.float16}[precision]
    return source, load_torch(source, _converted_shapes(models_dir)[0][0], device=device, dtype=dtype,
                              with_safety_checker=safety_checker)


def mil_models(folder, models_dir, device, safety_checker, torch_compile=False):
    from python_coreml_sd.generation.setup import converted_models
    from python_coreml_sd.model_sources import resolve

    models = converted_models(models_dir, "mil", device, torch_compile=torch_compile)
    if not safety_checker:
        models.components.pop("safety_checker", None)
    return resolve(str(folder)), models


def warmed_pipeline(models, source, device, safety_checker):
    """The pipeline of one row, after one 2-step image (compilation, graph capture, lazy init). Returns
    (pipeline, warm-up seconds)."""
    import torch
    from python_coreml_sd.generation.pipeline import GenerationRequest
    from python_coreml_sd.generation.setup import build_pipeline

    if safety_checker != ("safety_checker" in models):
        raise SystemExit(f"safety checker {'missing' if safety_checker else 'present'} on one side")
    pipe = build_pipeline(models, source, progress=False)
    start = time.perf_counter()
    pipe.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=2))
    if device == "cuda":
        torch.cuda.synchronize()
    return pipe, time.perf_counter() - start


def timed_rounds(pipes: list, steps: int, repeat: int) -> list:
    """Each pipeline's results of `repeat` timed images, made in rounds (one image of every row per round),
    so that a change of machine load during the run touches every row alike."""
    from python_coreml_sd.generation.pipeline import GenerationRequest

    results = [[] for _ in pipes]
    for round_ in range(repeat):
        for pipe, out in zip(pipes, results):
            out.append(pipe.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=steps)))
        print(f"round {round_ + 1}/{repeat}: " + ", ".join(f"{r[-1].seconds_total:.2f} s" for r in results), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", help="registry family (default: sd1, full-size SD 1.5)")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--attention", default="ORIGINAL", help="UNet attention of the converted model")
    parser.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                        help="neither side runs the safety checker (default: both do)")
    parser.add_argument("--no-fast-torch", action="store_true", help="skip the torch.compile (+ CUDA graph) row")
    parser.add_argument("--no-compiled-mil", action="store_true", help="skip the mil, UNet torch.compile row")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/python_coreml_sd_bench"))
    parser.add_argument("--repeat", type=int, default=3, help="timed images per row (median shown; default 3)")
    args = parser.parse_args()
    import python_coreml_sd
    from python_coreml_sd.console import quiet_third_party
    quiet_third_party()
    print(f"python_coreml_sd from {Path(python_coreml_sd.__file__).parent}", flush=True)
    from python_coreml_sd import registry
    if args.safety_checker and "safety_checker" not in registry.family(args.family)["architecture"]:
        print(f"family {args.family} has no safety checker: neither side runs one", flush=True)
        args.safety_checker = False
    folder, models_dir = prepare(args.family, args.work_dir, args.attention, args.safety_checker)
    precision = "float16" if args.device == "cuda" else "float32"
    rows = []  # (label, pipeline, warm-up s): every row held at once, for interleaved timing

    source, models = torch_models(folder, models_dir, args.device, precision, args.safety_checker)
    rows.append(("torch eager", *warmed_pipeline(models, source, args.device, args.safety_checker)))
    if not args.no_fast_torch:
        rows.append(fast_torch_row(models, source, args))
    for label, torch_compile in [("mil", False)] + ([] if args.no_compiled_mil else [("mil, UNet torch.compile", True)]):
        source, models = mil_models(folder, models_dir, args.device, args.safety_checker, torch_compile)
        rows.append((label, *warmed_pipeline(models, source, args.device, args.safety_checker)))
    for label, _, warmup in rows:
        print(f"{label}: ready (warm-up {warmup:.1f} s)", flush=True)
    results = timed_rounds([pipe for _, pipe, _ in rows], args.steps, args.repeat)
    print_table(args, precision, [(label, warmup, res) for (label, _, warmup), res in zip(rows, results)])


def fast_torch_row(eager_models, source, args):
    """The torch row with the UNet under torch.compile (+ CUDA graph on CUDA), on a copy of the eager row's
    ModelSet (the modules are shared). On CUDA a failed compile falls back to eager + CUDA graph, and says so."""
    from python_coreml_sd.generation.components import Component, ModelSet
    from torch_baselines import FastTorchModel

    models = ModelSet(dict(eager_models.components), eager_models.any_prompt_length)
    unet = eager_models["unet"]
    graph = args.device == "cuda"
    label = "torch, UNet torch.compile + CUDA graph" if graph else "torch, UNet torch.compile"
    models.components["unet"] = Component(FastTorchModel(unet.model, compile_module=True, cuda_graph=graph),
                                          unet.input_shapes)
    try:
        return (label, *warmed_pipeline(models, source, args.device, args.safety_checker))
    except Exception as exc:
        if not graph:
            raise
        print(f"{label} failed ({type(exc).__name__}: {exc}); falling back to eager + CUDA graph", flush=True)
        import torch
        torch._dynamo.reset()
        models.components["unet"] = Component(FastTorchModel(unet.model, compile_module=False), unet.input_shapes)
        return ("torch, UNet eager + CUDA graph (torch.compile failed)",
                *warmed_pipeline(models, source, args.device, args.safety_checker))


def print_table(args, precision, rows):
    """rows: (label, warm-up s, [results of the timed images]); the first row is the reference."""
    import statistics
    import numpy as np
    from python_coreml_sd.metrics import psnr

    reference = np.asarray(rows[0][2][0].image, np.float32)
    size = rows[0][2][0].image.size
    checker = "safety checker on both sides" if args.safety_checker else "no safety checker on either side"
    print(f"\n{args.family}, {size[0]}x{size[1]}, {args.steps} steps, PNDM, {args.device}, torch {precision}, "
          f"converted fp16 ({args.attention}), {checker}; median of {args.repeat} images per row, timed in interleaved rounds")
    print("| backend | s / image | s / step | vs torch eager | warm-up s | image PSNR vs torch eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    ref_s = statistics.median(r.seconds_total for r in rows[0][2])
    for label, warmup, results in rows:
        seconds = statistics.median(r.seconds_total for r in results)
        per_step = statistics.median(r.seconds_per_step for r in results)
        agreement = "" if label == "torch eager" else f"{psnr(reference, np.asarray(results[0].image, np.float32)):.1f} dB"
        print(f"| {label} | {seconds:.2f} | {per_step:.4f} | {seconds / ref_s:.2f}x | {warmup:.1f} | {agreement} |")


if __name__ == "__main__":
    main()
