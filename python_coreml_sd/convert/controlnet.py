"""ControlNets -> Core ML, Apple's interface: `sample`, `timestep`, `encoder_hidden_states` ((B, C, 1, S) layout),
SDXL's `time_ids` and `text_embeds` (ours: Apple converts no SDXL ControlNet), and `controlnet_cond`
(B, 3, 8h, 8w) in [0, 1] -> `additional_residual_0..N-1`, the residuals the controlled UNet
(--unet-support-controlnet) takes under the same names. One package per ControlNet, ControlNet_<name>.mlpackage
('/' -> '_'), at the latent size and batch of the model's UNet."""
from pathlib import Path

import torch

from ..components import SDXL, TABLE, controlled_dims, interface_of, text_pooled_width
from ..controlnets import resolve_controlnet
from ..layers.unet import DiffusersControlNet
from .common import convert_traced_component, kept_existing
from .unet import (DESCRIPTIONS, check_controlled_sizes, enumerated_shapes, example_dims, latent_size, sample_inputs,
                   text_sequence_length)

CONTROLNET_DESCRIPTIONS = {
    **{k: DESCRIPTIONS[k] for k in TABLE["unet"].io(SDXL).inputs},
    "controlnet_cond": "The condition image (edges, depth, pose...), NCHW in [0, 1], at 8x the latent size",
}
RESIDUAL_DESCRIPTION = "A residual for the controlled UNet's input of the same name (scale it to weaken the control)"


def output_paths(options) -> list:
    return [Path(options.output_dir) / TABLE["controlnet"].package_name(name) for name in options.controlnets]


def check_request(source, options) -> None:
    """Before any conversion: each ControlNet exists and fits the model's UNet (SDXL's for SDXL's)."""
    for name in options.controlnets:
        resolve_controlnet(name).check_fits(source.config("unet"), source.name)
    check_controlled_sizes(options)


def example_inputs(unet_config: dict, batch: int, h: int, w: int, seq_len: int, text_pooled: int = None) -> dict:
    """The UNet's example inputs (`sample_inputs`; SDXL's: with its added conditions) and a condition image."""
    inputs = sample_inputs(unet_config, batch, h, w, seq_len, text_pooled)
    dims = example_dims(unet_config, inputs, controlled_dims)
    (*_, cond) = TABLE["controlnet"].shapes(dims)
    inputs["controlnet_cond"] = torch.rand(*cond, generator=torch.Generator().manual_seed(2))
    return inputs


def convert_controlnets(source, options) -> list:
    unet_config = source.config("unet")
    batch, (h, w) = 1 if options.unet_batch_one else 2, latent_size(unet_config, options)
    inputs = example_inputs(unet_config, batch, h, w, text_sequence_length(source, options), text_pooled_width(source))
    io = TABLE["controlnet"].io(interface_of(unet_config))
    outputs = io.output_names(example_dims(unet_config, inputs, controlled_dims))
    # each --latent-sizes size by 1..--max-prompt-chunks windows, as the controlled UNet's: they pair variant by variant
    enumerated = enumerated_shapes(unet_config, inputs, options, "controlnet")
    descriptions = {**{k: CONTROLNET_DESCRIPTIONS[k] for k in io.inputs}, **dict.fromkeys(outputs, RESIDUAL_DESCRIPTION)}
    written = []
    for name, out in zip(options.controlnets, output_paths(options)):
        if not kept_existing([out], options, "controlnet"):
            convert_traced_component(DiffusersControlNet(resolve_controlnet(name).load()), inputs, list(outputs),
                                     options, "controlnet", descriptions, enumerated=enumerated, out=out)
        written.append(out)
    return written
