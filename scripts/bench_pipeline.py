#!/usr/bin/env python
"""Seconds per image: the reference `torch` backend (diffusers modules, fp16) against the `mil` backend
(our MIL runtime running the converted fp16 .mlpackage files), same model, prompt, seed and
scheduler, in one run. Prints a table.

    python scripts/bench_pipeline.py --family sd1 --device cuda --steps 50     # full-size SD 1.5, 512x512
    python scripts/bench_pipeline.py --family tiny --device cpu --steps 10

The model is the family's architecture with random weights (seed 0), built once into --work-dir;
conversion (text encoder, UNet with ORIGINAL attention, VAE decoder) is cached there too.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(family: str, work_dir: Path, attention: str):
    os.environ["PYTHON_COREML_SD_CACHE"] = str(work_dir / "models")
    from python_coreml_sd.convert.common import ConversionOptions
    from python_coreml_sd.random_models import materialized_model_dir
    from python_coreml_sd.torch2coreml import convert

    start = time.perf_counter()
    folder = materialized_model_dir(family)
    print(f"model folder: {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
    out = work_dir / f"{family}-{attention.lower()}"
    start = time.perf_counter()
    convert(ConversionOptions(str(folder), out, attention_implementation=attention),
            ["text_encoder", "unet", "vae_decoder"])
    print(f"converted into {out} ({time.perf_counter() - start:.0f} s)", flush=True)
    return folder, out


def time_backend(backend, folder, models_dir, device, precision, steps, prompt):
    import torch
    from python_coreml_sd.generation.pipeline import GenerationRequest
    from python_coreml_sd.generation.setup import open_pipeline

    pipe = open_pipeline(backend, models_dir, str(folder), device, torch_precision=precision, progress=False)
    pipe.generate(GenerationRequest(prompt=prompt, seed=1, num_inference_steps=2))  # warm-up: kernels, caches
    if device == "cuda":
        torch.cuda.synchronize()
    result = pipe.generate(GenerationRequest(prompt=prompt, seed=1, num_inference_steps=steps))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", help="registry family (default: sd1, full-size SD 1.5)")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--attention", default="ORIGINAL", help="UNet attention of the converted model")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/python_coreml_sd_bench"))
    args = parser.parse_args()
    from python_coreml_sd.console import quiet_third_party
    from python_coreml_sd.metrics import psnr
    import numpy as np
    quiet_third_party()
    folder, models_dir = prepare(args.family, args.work_dir, args.attention)
    prompt = "a photo of an astronaut riding a horse on mars"
    precision = "float16" if args.device == "cuda" else "float32"
    rows = []
    results = {}
    for backend in ("torch", "mil"):
        result = time_backend(backend, folder, models_dir, args.device, precision, args.steps, prompt)
        results[backend] = result
        rows.append((backend, result.seconds_total, result.seconds_per_step))
    agreement = psnr(np.asarray(results["torch"].image, np.float32), np.asarray(results["mil"].image, np.float32))
    size = results["torch"].image.size
    print(f"\n{args.family}, {size[0]}x{size[1]}, {args.steps} steps, PNDM, {args.device}, torch {precision}, "
          f"converted fp16 ({args.attention})")
    print("| backend | s / image | s / step | vs torch |")
    print("| --- | --- | --- | --- |")
    for backend, total, per_step in rows:
        print(f"| {backend} | {total:.2f} | {per_step:.4f} | {total / rows[0][1]:.2f}x |")
    print(f"final image PSNR mil vs torch: {agreement:.1f} dB")


if __name__ == "__main__":
    main()
