"""Generate images with Stable Diffusion from converted Core ML models (or the original PyTorch modules).

    python -m python_coreml_sd.pipeline --prompt "a photo of an astronaut riding a horse" -i MODELS -o OUT

Backends: `coreml` (Core ML, macOS only), `mil` (our MIL runtime on PyTorch, CPU or CUDA: runs the
very .mlpackage files that ship), `torch` (the original diffusers modules: the reference).
"""

if __name__ == "__main__":  # before the imports below, which take seconds: Ctrl-C then ends in one line
    from python_coreml_sd.console import handle_interrupts, quiet_start
    handle_interrupts("pipeline")
    quiet_start()

import argparse
import sys
from pathlib import Path

from . import registry
from .console import OneLineErrorParser, positive_int, quiet_third_party, run_cli, show_own_warnings
from .errors import UserError
from .generation.schedulers import SCHEDULERS
from .generation.jobs import generate_images
from .generation.setup import PIPELINE_BACKENDS
from .runtime import default_backend
from .single_file import PREDICTION_HELP, PREDICTION_TYPES

PROG = "pipeline"
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared with the parity CLI."""
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    p.add_argument("-i", dest="models_dir", type=Path,
                   help="folder of converted models (.mlpackage, or .mlmodelc with --backend coreml), a "
                        "Resources folder, or a bundle .zip (checked, extracted once into the cache); "
                        "required except for --backend torch")
    p.add_argument("-o", dest="output_dir", type=Path, default=Path("."), help="folder for the PNG files (default: .)")
    p.add_argument("--seed", type=int, default=93, help="random seed of the initial latents (default: 93)")
    p.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance; at most 1 means none, as diffusers: the UNet runs once per step on "
                        "the prompt alone (default: 7.5; 0 for stabilityai/sdxl-turbo, distilled without guidance: "
                        "pass --model-version stabilityai/sdxl-turbo, ideally with a UNet converted with "
                        "--unet-batch-one, and 1-4 steps)")
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS),
                   help="diffusers scheduler (default: PNDM; EulerAncestralDiscrete for stabilityai/sdxl-turbo)")
    p.add_argument("--height", type=positive_int,
                   help="image height in pixels: one of the sizes the models were converted for (--latent-sizes; "
                        "default: their first)")
    p.add_argument("--width", type=positive_int, help="image width in pixels (as --height)")
    p.add_argument("--image", type=Path, help="img2img: start from this image (needs a converted VAE encoder)")
    p.add_argument("--strength", type=float,
                   help="img2img: how much to change --image, in (0, 1] (default: 0.75; with --mask 1, SDXL's 0.9999, "
                        "as diffusers' inpainting pipelines)")
    p.add_argument("--mask", type=Path,
                   help="inpainting: repaint the white part of --image (a mask of its size; needs the VAE encoder "
                        "and an inpainting UNet, 9 input channels, or an ordinary UNet with an inpaint --controlnet, "
                        "whose condition is then the masked image unless --control-image is given)")
    p.add_argument("--model-version", default="tiny",
                   help="model whose tokenizer, scheduler config (and, for --backend torch, weights) to use: a "
                        f"diffusers folder, hub id or one of {', '.join(registry.model_names())} (default: tiny)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="with --model-version FILE: " + PREDICTION_HELP + " (as it was converted with)")
    p.add_argument("--compute-unit", choices=COMPUTE_UNITS, default="ALL",
                   help="Core ML compute units for --backend coreml (default: ALL)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device of the mil and torch backends (default: cpu)")
    p.add_argument("--torch-compile", action="store_true",
                   help="--backend mil: run the UNet through torch.compile (Inductor). The first image pays the "
                        "compilation (about a minute for a full-size UNet on a GPU, less once Inductor's cache "
                        "holds the kernels); later steps run fused kernels (docs/benchmarks.md)")
    p.add_argument("--torch-precision", choices=("float32", "float16"), default="float32",
                   help="precision of the torch backend (default: float32; float16 wants --device cuda)")
    xl = p.add_argument_group("SDXL")
    xl.add_argument("--original-size", type=float, nargs=2, metavar=("H", "W"),
                    help="micro-conditioning: the original image size in pixels (default: the image size)")
    xl.add_argument("--crops-coords-top-left", type=float, nargs=2, metavar=("Y", "X"), default=(0, 0),
                    help="micro-conditioning: the crop's top-left corner (default: 0 0)")
    xl.add_argument("--target-size", type=float, nargs=2, metavar=("H", "W"),
                    help="micro-conditioning: the target size in pixels (default: the image size)")
    xl.add_argument("--refiner-start", type=float, metavar="FRACTION",
                    help="hand the latents to the refiner after this fraction of the steps, in (0, 1) (diffusers' "
                         "denoising_end / denoising_start); needs the converted refiner (or, for --backend torch, "
                         "--refiner-version)")
    xl.add_argument("--refiner-version", metavar="MODEL",
                    help="the SDXL refiner the torch backend runs with --refiner-start (e.g. tiny-xl-refiner)")
    control = p.add_argument_group("ControlNet (SD 1.x / 2.x and SDXL)")
    control.add_argument("--controlnet", metavar="NAME", nargs="+",
                         help="steer the UNet with these ControlNets (several: their scaled residuals summed, as "
                              "diffusers' MultiControlNetModel): converted backends load ControlNet_<NAME>.mlpackage "
                              "and the UNet converted with --unet-support-controlnet from -i; torch loads NAME (a "
                              f"diffusers ControlNetModel folder or {', '.join(registry.controlnet_names())})")
    control.add_argument("--control-image", type=Path, nargs="+", metavar="IMAGE",
                         help="the ControlNets' condition images (edges, depth...), one per --controlnet in its order, "
                              "each resized to the image size")
    control.add_argument("--controlnet-scale", type=float, nargs="+", default=[1.0], metavar="S",
                         help="multiplies the ControlNets' residuals: one scale for all or one per --controlnet "
                              "(default: 1)")
    p.add_argument("--verbose", action="store_true", help="show the log of torch, diffusers and coremltools")


def parser_spec() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(p)
    p.add_argument("--backend", choices=PIPELINE_BACKENDS, default=default_backend(),
                   help=f"coreml (macOS), mil (anywhere) or torch (reference) (default here: {default_backend()})")
    p.add_argument("--num-images", type=int, default=1, help="images to generate, seeds seed, seed+1, ... (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNG files (default: refuse)")
    return p


def models_from_args(args):
    """The `--backend` / `-i` / `--model-version` / device flags as a typed `Models` (shared with parity)."""
    from .generation.jobs import Models
    return Models(args.backend, args.models_dir, args.model_version, args.device, args.compute_unit,
                  args.torch_precision, args.refiner_version, args.controlnet, args.prediction_type,
                  args.torch_compile)


def requests_from_args(args, seeds) -> list:
    from .generation.images import load_image
    from .generation.jobs import requests_for
    return requests_for([args.prompt], seeds, negative_prompt=args.negative_prompt,
                        num_inference_steps=args.num_inference_steps,
                        guidance_scale=_or_default(args.guidance_scale, args.model_version, "guidance_scale"),
                        scheduler=_or_default(args.scheduler, args.model_version, "scheduler"),
                        image=load_image(args.image) if args.image else None,
                        strength=args.strength, mask=load_image(args.mask, "--mask") if args.mask else None,
                        original_size=tuple(args.original_size) if args.original_size else None,
                        crops_coords_top_left=tuple(args.crops_coords_top_left),
                        target_size=tuple(args.target_size) if args.target_size else None,
                        refiner_start=args.refiner_start, height=args.height, width=args.width,
                        control_image=[load_image(path, "--control-image") for path in args.control_image]
                        if args.control_image else None, controlnet_scale=tuple(args.controlnet_scale))


def _or_default(value, model_version: str, key: str):
    return registry.generation_default(model_version, key) if value is None else value


def job_from_args(args):
    from .generation.jobs import ImageJob
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    seeds = [args.seed + k for k in range(args.num_images)]
    return ImageJob(models_from_args(args), requests_from_args(args, seeds), args.output_dir, args.overwrite)


def parameters(job, request) -> dict:
    """What a PNG's text chunks say about how it was made."""
    return {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
            "num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
            "scheduler": request.scheduler, "backend": job.models.backend, "device": job.models.device,
            "model_version": job.models.model_version, "strength": request.strength if request.image else None,
            "inpainting": request.mask is not None,
            "refiner_start": request.refiner_start, "controlnet": list(job.models.controlnet) or None,
            "controlnet_scale": list(request.controlnet_scale) if request.control_image else None,
            "generator": "python_coreml_sd"}


def main(argv=None) -> int:
    args = parser_spec().parse_args(argv)
    quiet_third_party(args.verbose)
    show_own_warnings(PROG)

    def body() -> int:
        job = job_from_args(args)
        generate_images(job, lambda request: parameters(job, request))
        return 0
    return run_cli(PROG, body, interrupted="interrupted")

if __name__ == "__main__":
    sys.exit(main())
