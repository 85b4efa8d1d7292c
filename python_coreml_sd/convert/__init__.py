"""Converters, one per Stable Diffusion component, over the shared steps in `common`.

`convert(options, components)` is the library entry point: the converter CLI parses flags into
`ConversionOptions` and calls it; tests and scripts call it directly.
"""
import sys
import time
from pathlib import Path

from ..components import TABLE, converter
from ..errors import UserError
from .options import ConversionOptions, check_compression, check_latent_size

__all__ = ["ConversionOptions", "convert"]


def check_request(source, options: ConversionOptions, components: list) -> None:
    """Everything that can be known to fail, checked before any work rather than after a component."""
    from . import text_encoder, unet
    from .common import output_path, reusable_existing

    for component in components:
        source.require(TABLE[component].source_folder)
        source.check_weights(TABLE[component].source_folder)
        outputs = unet.unet_output_paths(options) if component == "unet" else [output_path(options, component)]
        reusable_existing(outputs, options, component)
    check_latent_size(options)
    if "unet" in components:
        unet.check_options(source, options)
        if options.mixed_bit_recipe:
            unet.check_recipe(source, options)
    if "text_encoder" in components:
        text_encoder.check_options(source, options)


def convert(options: ConversionOptions, components: list) -> list:
    """Convert `components` (names in python_coreml_sd.components.TABLE) of `options.model_version`;
    returns the written package paths. Bad input raises UserError before anything is written."""
    from ..model_edits import source_for
    from ..package_io import prepare_output_dir

    if not components:
        raise UserError("nothing to convert; pass at least one --convert-* flag")
    check_compression(options)
    source = source_for(options)  # single files, LoRAs, embeddings, another VAE: a folder like any other
    check_request(source, options, components)
    prepare_output_dir(Path(options.output_dir))  # only once the input is known to be good
    written = []
    for index, component in enumerate(components, 1):
        print(f"[{index}/{len(components)}] {component}: converting...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        paths = converter(component)(source, options)
        written += paths
        print(f"[{index}/{len(components)}] {component}: {', '.join(p.name for p in paths)} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return written
