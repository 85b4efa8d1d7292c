"""Converters, one per Stable Diffusion component, over the shared steps in `common`.

`convert(options, components)` is the library entry point: the converter CLI parses flags into
`ConversionOptions` and calls it; tests and scripts call it directly.
"""
import sys
import time
from pathlib import Path

from ..components import TABLE, UNETS, converter
from ..errors import UserError
from .options import ConversionOptions, check_compression, check_shapes

__all__ = ["ConversionOptions", "convert"]


def check_request(sources: dict, options: ConversionOptions, components: list) -> None:
    """Everything that can be known to fail, checked before any work rather than after a component.
    `sources`: component -> the ModelSource it is converted from (the refiner's is another model)."""
    from . import controlnet, text_encoder, unet
    from .common import output_path, reusable_existing

    for component in components:
        source = sources[component]
        source.require(TABLE[component].source_folder, TABLE[component].flag)
        source.check_weights(TABLE[component].source_folder)
        outputs = (unet.unet_output_paths(options, component) if component in UNETS
                   else controlnet.output_paths(options) if component == "controlnet"
                   else [output_path(options, component)])
        reusable_existing(outputs, options, component)
    if "controlnet" in components:
        controlnet.check_request(sources["controlnet"], options)
    for component in (c for c in components if c in UNETS):
        unet.check_options(sources[component], options, component)
        if options.mixed_bit_recipe:
            unet.check_recipe(sources[component], options)
    if "text_encoder" in components or "text_encoder_2" in components:
        text_encoder.check_options(sources.get("text_encoder", sources.get("text_encoder_2")), options)


def with_controlnet(options: ConversionOptions, components: list) -> list:
    """--unet-support-controlnet: the controlled UNet in the UNet's place (Apple's); --convert-controlnet MODEL..."""
    if options.unet_support_controlnet and "unet" not in components:
        raise UserError("--unet-support-controlnet shapes the UNet: pass --convert-unet too")
    if bool(options.controlnets) != ("controlnet" in components):
        raise UserError("--convert-controlnet takes the ControlNets to convert: --convert-controlnet MODEL [MODEL ...]")
    return ["control-unet" if c == "unet" and options.unet_support_controlnet else c for c in components]


def convert(options: ConversionOptions, components: list) -> list:
    """Convert `components` (names in python_coreml_sd.components.TABLE) of `options.model_version`;
    returns the written package paths. Bad input raises UserError before anything is written."""
    from ..model_edits import source_for
    from ..package_io import prepare_output_dir

    if not components:
        raise UserError("nothing to convert; pass at least one --convert-* flag")
    check_compression(options)
    check_shapes(options)
    source = source_for(options)  # single files, LoRAs, embeddings, another VAE: a folder like any other
    from . import sdxl
    sdxl.check_base(source, options)
    refiner = sdxl.refiner_source(options) if options.refiner_version else None
    components = sdxl.with_companions(source, options, with_controlnet(options, components))
    sources = {component: refiner if component == "refiner" else source for component in components}
    check_request(sources, options, components)
    prepare_output_dir(Path(options.output_dir))  # only once the input is known to be good
    written = []
    for index, component in enumerate(components, 1):
        print(f"[{index}/{len(components)}] {component}: converting...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        paths = converter(component)(sources[component], options)
        written += paths
        print(f"[{index}/{len(components)}] {component}: {', '.join(p.name for p in paths)} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return written
