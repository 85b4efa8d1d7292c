"""Steps every component converter shares: trace, convert to an ML Program, describe, save atomically,
check against PyTorch."""
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..package_io import save_mlmodel
from ..errors import CheckFailed, UserError

log = logging.getLogger("python_coreml_sd")

DEPLOYMENT_TARGETS = ("macOS13", "iOS16", "macOS14", "iOS17", "macOS15", "iOS18")
ATTENTION_IMPLEMENTATIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
LICENSE = "CreativeML OpenRAIL-M (https://huggingface.co/spaces/CompVis/stable-diffusion-license)"
SHORT_DESCRIPTION = ("Stable Diffusion generates images conditioned on text or other images through the diffusion "
                     "process (https://arxiv.org/abs/2112.10752). Converted by python_coreml_sd.")


@dataclass
class ConversionOptions:
    model_version: str
    output_dir: Path
    compute_precision: str = "float16"  # or "float32"
    min_deployment_target: str = "macOS13"
    latent_h: int = None  # None: the model's config
    latent_w: int = None
    text_token_sequence_length: int = None
    attention_implementation: str = "SPLIT_EINSUM"
    unet_batch_one: bool = False
    chunk_unet: bool = False
    overwrite: bool = False
    check_output_correctness: bool = False
    psnr_threshold: float = 35.0
    quantize_nbits: int = None  # palettize every large weight of every component to this many bits
    mixed_bit_recipe: str = None  # JSON recipe (layer -> bits) for the UNet
    palettize_granularity: str = "per_tensor"  # or "per_grouped_channel" (iOS18 targets)
    palettize_group_size: int = 32


def model_slug(model_version: str) -> str:
    """The model part of output names: a repo id with '/' -> '_', a folder by its base name."""
    path = Path(model_version)
    if path.exists() or model_version.startswith((".", "/", "~")):
        return path.expanduser().resolve().name
    return model_version.replace("/", "_")


def output_path(options: ConversionOptions, component: str) -> Path:
    return Path(options.output_dir) / f"Stable_Diffusion_version_{model_slug(options.model_version)}_{component}.mlpackage"


def trace(module: torch.nn.Module, example_inputs: tuple):
    # check_trace=False skips a second full forward pass and graph comparison: 4x faster on a full UNet.
    with torch.no_grad():
        return torch.jit.trace(module.eval(), example_inputs, check_trace=False)


def _deployment_target(name: str):
    import coremltools as ct
    if name not in DEPLOYMENT_TARGETS:
        raise UserError(f"--min-deployment-target {name!r} is not supported; use one of {', '.join(DEPLOYMENT_TARGETS)}")
    return getattr(ct.target, name)


def to_mlprogram(traced, sample_inputs: "OrderedDict[str, torch.Tensor]", output_names: list,
                 options: ConversionOptions, input_dtypes: dict = None):
    """coremltools.convert to an ML Program with fixed shapes; returns an MLModel (not loaded)."""
    import coremltools as ct
    input_dtypes = input_dtypes or {}
    inputs = [ct.TensorType(name=name, shape=tuple(value.shape), dtype=input_dtypes.get(name, np.float32))
              for name, value in sample_inputs.items()]
    precision = {"float16": ct.precision.FLOAT16, "float32": ct.precision.FLOAT32}[options.compute_precision]
    return ct.convert(traced, convert_to="mlprogram", inputs=inputs,
                      outputs=[ct.TensorType(name=name, dtype=np.float32) for name in output_names],
                      compute_precision=precision,
                      minimum_deployment_target=_deployment_target(options.min_deployment_target),
                      skip_model_load=True)


def describe(mlmodel, options: ConversionOptions, component: str, descriptions: dict) -> None:
    """Metadata Apple's pipelines and Xcode show, plus our own user-defined fields."""
    mlmodel.short_description = SHORT_DESCRIPTION
    mlmodel.author = f"Converted from {options.model_version}; refer to its model card"
    mlmodel.license = LICENSE
    mlmodel.version = options.model_version
    for name, text in descriptions.items():
        if name in mlmodel.input_description:
            mlmodel.input_description[name] = text
        else:
            mlmodel.output_description[name] = text
    meta = mlmodel.user_defined_metadata
    meta["com.python_coreml_sd.source_model"] = options.model_version
    meta["com.python_coreml_sd.component"] = component
    meta["com.python_coreml_sd.converter_version"] = __version__
    meta["com.python_coreml_sd.compute_precision"] = options.compute_precision
    meta["com.python_coreml_sd.min_deployment_target"] = options.min_deployment_target
    if component.startswith("unet"):
        meta["com.python_coreml_sd.attention_implementation"] = options.attention_implementation
    if options.quantize_nbits:
        meta["com.python_coreml_sd.quantize_nbits"] = str(options.quantize_nbits)
    if options.mixed_bit_recipe and component.startswith("unet"):
        meta["com.python_coreml_sd.mixed_bit_recipe"] = Path(options.mixed_bit_recipe).name


def compress(mlmodel, options: ConversionOptions, component: str):
    """Palettize the converted program when asked: `--quantize-nbits` for every component, a mixed-bit
    recipe for the UNet (its layer names are the UNet's). Returns the model to save."""
    recipe = options.mixed_bit_recipe if component.startswith("unet") else None
    if not options.quantize_nbits and not recipe:
        return mlmodel
    from ..compression.recipes import load_recipe
    from ..compression.palettize import palettize_model
    return palettize_model(mlmodel, options.quantize_nbits, options.palettize_granularity,
                           options.palettize_group_size, recipe=load_recipe(recipe) if recipe else None)


def save(mlmodel, dest: Path, overwrite: bool) -> Path:
    return save_mlmodel(mlmodel, dest, overwrite)


def check_correctness(reference: dict, mlpackage: Path, inputs: dict, threshold: float) -> dict:
    """Run the converted model (Core ML on macOS, the MIL runtime elsewhere) on `inputs` and compare each
    output with the PyTorch `reference`. Prints PSNR per output; raises CheckFailed under `threshold`."""
    from ..metrics import psnr
    from ..runtime import default_backend, load_model

    model = load_model(mlpackage, backend=default_backend())
    outputs = model.predict({k: np.asarray(v) for k, v in inputs.items()})
    results = {name: psnr(ref, outputs[name]) for name, ref in reference.items()}
    for name, value in results.items():
        print(f"  {mlpackage.name}: {name} PSNR {value:.1f} dB (threshold {threshold:.1f} dB)")
    failing = {k: v for k, v in results.items() if v < threshold}
    if failing:
        raise CheckFailed(f"{mlpackage.name}: PSNR under {threshold} dB for "
                          + ", ".join(f"{k} ({v:.1f} dB)" for k, v in failing.items()))
    return results


def kept_existing(paths: list, options: ConversionOptions, component: str) -> bool:
    """True (and says so) when every output of `component` exists and --overwrite was not given."""
    if options.overwrite or not all(Path(p).exists() for p in paths):
        return False
    log.info("%s: %s exist(s), skipping (pass --overwrite to replace)", component, ", ".join(map(str, paths)))
    return True


def convert_traced_component(module, inputs: "OrderedDict[str, torch.Tensor]", output_names: list,
                             options: ConversionOptions, component: str, descriptions: dict,
                             checked_outputs: list = None) -> list:
    """Trace `module`, convert, describe, palettize if asked, save atomically, and with
    --check-output-correctness compare `checked_outputs` (default: all) with PyTorch."""
    out = output_path(options, component)
    mlmodel = to_mlprogram(trace(module, tuple(inputs.values())), inputs, output_names, options)
    describe(mlmodel, options, component, descriptions)
    save(compress(mlmodel, options, component), out, options.overwrite)
    if options.check_output_correctness:
        with torch.no_grad():
            outputs = module(*inputs.values())
        outputs = dict(zip(output_names, outputs if isinstance(outputs, tuple) else (outputs,)))
        reference = {name: outputs[name].numpy() for name in (checked_outputs or output_names)}
        check_correctness(reference, out, {k: v.numpy().astype(np.float32) for k, v in inputs.items()},
                          options.psnr_threshold)
    return [out]
