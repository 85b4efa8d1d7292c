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
one timed image.
"""
import argparse
import gc
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


def fast_unet(models, device):
    """Swap the UNet for torch.compile + CUDA graph (CUDA) or torch.compile (CPU). Returns the label."""
    from python_coreml_sd.generation.components import Component
    from torch_baselines import FastTorchModel

    unet = models["unet"]
    graph = device == "cuda"
    models.components["unet"] = Component(FastTorchModel(unet.model, compile_module=True, cuda_graph=graph),
                                          unet.input_shapes)
    return unet


def time_pipeline(models, source, steps, device, safety_checker):
    import torch
    from python_coreml_sd.generation.pipeline import GenerationRequest
    from python_coreml_sd.generation.setup import build_pipeline

    if safety_checker != ("safety_checker" in models):
        raise SystemExit(f"safety checker {'missing' if safety_checker else 'present'} on one side")
    pipe = build_pipeline(models, source, progress=False)
    start = time.perf_counter()
    pipe.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=2))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    warmup = time.perf_counter() - start
    result = pipe.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=steps))
    return result, warmup


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
    args = parser.parse_args()
    import numpy as np
    import python_coreml_sd
    from python_coreml_sd.console import quiet_third_party
    from python_coreml_sd.metrics import psnr
    quiet_third_party()
    print(f"python_coreml_sd from {Path(python_coreml_sd.__file__).parent}", flush=True)
    from python_coreml_sd import registry
    if args.safety_checker and "safety_checker" not in registry.family(args.family)["architecture"]:
        print(f"family {args.family} has no safety checker: neither side runs one", flush=True)
        args.safety_checker = False
    folder, models_dir = prepare(args.family, args.work_dir, args.attention, args.safety_checker)
    precision = "float16" if args.device == "cuda" else "float32"
    rows = []  # (label, result, warm-up s)

    source, models = torch_models(folder, models_dir, args.device, precision, args.safety_checker)
    result, warmup = time_pipeline(models, source, args.steps, args.device, args.safety_checker)
    rows.append(("torch eager", result, warmup))
    print(f"torch eager: {result.seconds_total:.2f} s / image (warm-up {warmup:.1f} s)", flush=True)
    if not args.no_fast_torch:
        eager_unet = fast_unet(models, args.device)
        label = ("torch, UNet torch.compile + CUDA graph" if args.device == "cuda"
                 else "torch, UNet torch.compile")
        try:
            result, warmup = time_pipeline(models, source, args.steps, args.device, args.safety_checker)
        except Exception as exc:
            if args.device != "cuda":
                raise
            print(f"{label} failed ({type(exc).__name__}: {exc}); falling back to eager + CUDA graph", flush=True)
            from python_coreml_sd.generation.components import Component
            from torch_baselines import FastTorchModel
            import torch
            torch._dynamo.reset()
            models.components["unet"] = Component(FastTorchModel(eager_unet.model, compile_module=False),
                                                  eager_unet.input_shapes)
            label = "torch, UNet eager + CUDA graph (torch.compile failed)"
            result, warmup = time_pipeline(models, source, args.steps, args.device, args.safety_checker)
        rows.append((label, result, warmup))
        print(f"{label}: {result.seconds_total:.2f} s / image (warm-up {warmup:.1f} s)", flush=True)
    del models
    gc.collect()
    for label, torch_compile in [("mil", False)] + ([] if args.no_compiled_mil else [("mil, UNet torch.compile", True)]):
        source, models = mil_models(folder, models_dir, args.device, args.safety_checker, torch_compile)
        result, warmup = time_pipeline(models, source, args.steps, args.device, args.safety_checker)
        rows.append((label, result, warmup))
        print(f"{label}: {result.seconds_total:.2f} s / image (warm-up {warmup:.1f} s)", flush=True)
        del models
        gc.collect()

    reference = np.asarray(rows[0][1].image, np.float32)
    size = rows[0][1].image.size
    checker = "safety checker on both sides" if args.safety_checker else "no safety checker on either side"
    print(f"\n{args.family}, {size[0]}x{size[1]}, {args.steps} steps, PNDM, {args.device}, torch {precision}, "
          f"converted fp16 ({args.attention}), {checker}")
    print("| backend | s / image | s / step | vs torch eager | warm-up s | image PSNR vs torch eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, result, warmup in rows:
        agreement = "" if label == "torch eager" else f"{psnr(reference, np.asarray(result.image, np.float32)):.1f} dB"
        print(f"| {label} | {result.seconds_total:.2f} | {result.seconds_per_step:.4f} | "
              f"{result.seconds_total / rows[0][1].seconds_total:.2f}x | {warmup:.1f} | {agreement} |")


if __name__ == "__main__":
    main()
