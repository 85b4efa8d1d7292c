"""Convert Stable Diffusion components (PyTorch / diffusers) to Core ML ML Programs (.mlpackage).

    python -m python_coreml_sd.torch2coreml --convert-text-encoder --convert-vae-decoder \\
        --convert-vae-encoder --convert-unet --convert-safety-checker --model-version tiny -o out/
"""

if __name__ == "__main__":  # before the imports below, which take seconds: Ctrl-C then ends in one line
    from python_coreml_sd.console import handle_interrupts, quiet_start
    handle_interrupts("torch2coreml")
    quiet_start()

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from . import registry
from ._version import __version__
from .components import FLAGGED, TABLE
from .console import OneLineErrorParser, positive_int, quiet_third_party, run_cli
from .compression.palettize import GRANULARITIES, SUPPORTED_NBITS
from .convert import ConversionOptions, convert
from .convert.options import DEPLOYMENT_TARGETS, EmbeddingSpec, LoraSpec, parse_latent_sizes
from .single_file import PREDICTION_HELP, PREDICTION_TYPES
from .layers.attention import ATTENTION_IMPLEMENTATIONS

PROG = "torch2coreml"
COMPONENTS = FLAGGED  # in conversion order (python_coreml_sd/components.py); the others come with one of these


COMPANION_HELP = {"text_encoder": " (of an SDXL model: both text encoders, TextEncoder and TextEncoder2)",
                  "unet": " (with --refiner-version: the refiner's UNet too, UnetRefiner)"}


def parser_spec() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to convert (at least one)")
    for component in COMPONENTS:
        if component == "controlnet":  # a list of models, as Apple's
            what.add_argument(TABLE[component].flag, nargs="+", default=[], metavar="MODEL",
                              help="convert ControlNets (diffusers ControlNetModel folders, or the registry's "
                                   f"{', '.join(registry.controlnet_names())}) for --model-version's UNet, each as "
                                   "ControlNet_<MODEL>.mlpackage (Resources: controlnet/); the UNet they feed comes "
                                   "with --convert-unet --unet-support-controlnet")
            continue
        what.add_argument(TABLE[component].flag, action="store_true",
                          help=f"convert the {component.replace('_', ' ')}" + COMPANION_HELP.get(component, ""))
    p.add_argument("--model-version", default="tiny",
                   help="a diffusers model folder, a single-file checkpoint (FILE.safetensors of SD 1.x / 2.x in "
                        "the original layout: family and variant recognised from its tensors; .ckpt needs "
                        "--allow-pickle), a Hugging Face repo id (needs the hub), or a registry name: "
                        f"{', '.join(registry.model_names())} (default: tiny, the embedded toy model)")
    p.add_argument("--xl-version", action="store_true",
                   help="the model is SDXL (as Apple's flag); an SDXL folder (its model_index.json, its UNet's "
                        "text_time conditions) is recognised without it, a model that is not SDXL is refused with it")
    p.add_argument("--refiner-version", metavar="MODEL",
                   help="an SDXL refiner (folder, registry name such as tiny-xl-refiner, hub id) whose UNet "
                        "--convert-unet converts too, as <model>_refiner.mlpackage (Resources: UnetRefiner)")
    p.add_argument("-o", default=".", type=Path, help="output folder for the .mlpackage files (default: .)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    edits = p.add_argument_group("model edits, applied before converting (see docs/model_files.md)")
    edits.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="merge a LoRA (.safetensors, diffusers/PEFT or kohya/A1111 format) into the UNet and "
                            "text encoder with SCALE (default 1); repeatable, merged in order; the packages' "
                            "metadata lists each with its sha256 and scale")
    edits.add_argument("--textual-inversion", action="append", default=[], metavar="FILE[:TOKEN]",
                       help="add a textual-inversion embedding to the text encoder and TOKEN to the tokenizer "
                            "(default token: the one the file names, else its file name); repeatable; bundles "
                            "carry the tokens in added_tokens.json")
    edits.add_argument("--custom-vae-version", metavar="MODEL_OR_FILE",
                       help="replace the model's VAE: a model (folder, registry name, hub id) whose VAE to use, a "
                            "diffusers VAE folder, or a VAE .safetensors file (original or diffusers layout)")
    edits.add_argument("--allow-pickle", action="store_true",
                       help="load pickled files (.ckpt, .pt, .bin) for --model-version, --lora, --textual-inversion, "
                            "--custom-vae-version, as tensors only (torch.load weights_only); only for files you trust")
    edits.add_argument("--prediction-type", choices=PREDICTION_TYPES, help=PREDICTION_HELP)
    shape = p.add_argument_group("shapes")
    shape.add_argument("--latent-h", type=positive_int, help="latent height; image height / 8 (default: model config)")
    shape.add_argument("--latent-w", type=positive_int, help="latent width; image width / 8 (default: model config)")
    shape.add_argument("--latent-sizes", metavar="HxW[,HxW...]|aspect:PIXELS",
                       help="latent sizes (image size / 8) the UNet and VAE packages all accept, as Core ML "
                            "enumerated shapes; the first is the default, the one the Neural Engine compiles for "
                            "(list your most used size first); instead of --latent-h/--latent-w. aspect:PIXELS: 1:1, "
                            "4:3, 3:4, 16:9, 9:16 at PIXELS x PIXELS pixels' area, sides rounded to 8 latents")
    shape.add_argument("--max-prompt-chunks", type=positive_int, default=1, metavar="N",
                       help="the UNet takes prompts of 1..N text-encoder windows (77 * k tokens, enumerated shapes; "
                            "long prompts are encoded 75 tokens a window); with several --latent-sizes, needs "
                            "--min-deployment-target iOS18 or macOS15 (default: 1)")
    shape.add_argument("--text-token-sequence-length", type=positive_int,
                       help="token sequence length of the text encoder (default: its max_position_embeddings, 77)")
    prog = p.add_argument_group("program")
    prog.add_argument("--compute-precision", choices=("float16", "float32"), default="float16",
                      help="precision of weights and compute in the ML Program (default: float16)")
    prog.add_argument("--min-deployment-target", choices=DEPLOYMENT_TARGETS, default="macOS13",
                      help="oldest OS the models must run on (default: macOS13; iOS16 is its iOS twin)")
    unet = p.add_argument_group("UNet")
    unet.add_argument("--attention-implementation", choices=ATTENTION_IMPLEMENTATIONS, default="SPLIT_EINSUM",
                      help="ORIGINAL for the GPU, SPLIT_EINSUM for the Neural Engine, SPLIT_EINSUM_V2 for the "
                           "Neural Engine of iOS 17 / macOS 14 and newer (default: SPLIT_EINSUM)")
    unet.add_argument("--unet-batch-one", action="store_true",
                      help="batch 1 UNet (two calls per step) instead of batch 2 (classifier-free guidance)")
    unet.add_argument("--unet-support-controlnet", action="store_true",
                      help="the UNet takes a ControlNet's residuals (additional_residual_0, ...), written as "
                           "<model>_control-unet.mlpackage (Resources: ControlledUnet) instead of the plain UNet")
    unet.add_argument("--chunk-unet", action="store_true",
                      help="also split the UNet into two mlpackages of about equal weight size (for iOS)")
    compression = p.add_argument_group("weight compression (palettization; see docs/compression.md)")
    compression.add_argument("--quantize-nbits", type=int, choices=SUPPORTED_NBITS,
                             help="palettize every weight of more than 2,048 values to a look-up table of 2^N "
                                  "fp16 entries (constexpr_lut_to_dense); 6 keeps images close to fp16; 3 needs "
                                  "--min-deployment-target iOS18 or macOS15")
    compression.add_argument("--palettize-granularity", choices=GRANULARITIES,
                             default="per_tensor", help="one table per tensor (default) or per group of output "
                                                        "channels (needs --min-deployment-target iOS18 or macOS15)")
    compression.add_argument("--palettize-group-size", type=positive_int, default=32,
                             help="output channels per table with per_grouped_channel (default: 32)")
    compression.add_argument("--mixed-bit-recipe", type=Path,
                             help="JSON recipe (UNet layer -> bits) from python -m python_coreml_sd.compression."
                                  "mixed_bit; applied to the UNet, unlisted layers keep --quantize-nbits or fp16")
    check = p.add_argument_group("verification")
    check.add_argument("--check-output-correctness", action="store_true",
                       help="run PyTorch and the converted model (Core ML on macOS, the MIL runtime elsewhere) "
                            "on the same random inputs, print PSNR per output, exit 1 under the threshold")
    check.add_argument("--psnr-threshold", type=float, default=35.0, help="PSNR floor in dB (default: 35)")
    bundle = p.add_argument_group("bundles for apps (after converting; see docs/bundles.md)")
    kind = bundle.add_mutually_exclusive_group()
    kind.add_argument("--bundle-resources-for-swift-cli", action="store_true",
                      help="compile the packages with xcrun coremlcompiler (macOS only) into OUT/Resources as Apple's "
                           "Swift pipeline loads them: TextEncoder.mlmodelc, Unet.mlmodelc (or UnetChunk1/2), "
                           "VAEDecoder, VAEEncoder, SafetyChecker, plus vocab.json and merges.txt")
    kind.add_argument("--bundle-packages", action="store_true",
                      help="any OS: OUT/Resources with the .mlpackage files under the same names (TextEncoder.mlpackage, "
                           "Unet.mlpackage, ...) plus vocab.json and merges.txt; a Mac compiles them at first load")
    bundle.add_argument("--zip", action="store_true",
                        help="also archive the bundle as OUT/coreml-<model>[-palettized]_<attention>_<compiled|packages>"
                             ".zip: reproducible (same inputs, same sha256), with manifest.json (sha256 of every file)")
    p.add_argument("--verbose", action="store_true", help="show the log of torch, diffusers and coremltools")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def options_from_args(args) -> ConversionOptions:
    """The flags named as ConversionOptions' fields taken as they are; the others parsed."""
    same = {field.name: getattr(args, field.name) for field in fields(ConversionOptions) if hasattr(args, field.name)}
    return ConversionOptions(**{**same, "output_dir": args.o, "controlnets": tuple(args.convert_controlnet),
        "latent_sizes": parse_latent_sizes(args.latent_sizes) if args.latent_sizes is not None else (),
        "mixed_bit_recipe": str(args.mixed_bit_recipe) if args.mixed_bit_recipe else None,
        "loras": tuple(LoraSpec.parse(v) for v in args.lora),
        "textual_inversions": tuple(EmbeddingSpec.parse(v) for v in args.textual_inversion)})


def main(argv=None) -> int:
    args = parser_spec().parse_args(argv)
    quiet_third_party(args.verbose)
    return run_cli(PROG, lambda: run(args))


def run(args) -> int:
    from .bundle import plan_bundle
    options = options_from_args(args)
    components = [c for c in COMPONENTS if getattr(args, f"convert_{c}")]  # none: convert refuses at once
    plan = plan_bundle(options, args.bundle_resources_for_swift_cli, args.bundle_packages, args.zip) if components else None
    paths = convert(options, components)
    if plan:
        plan.build(paths)
    print(f"done: {len(paths)} package(s) in {args.o}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
