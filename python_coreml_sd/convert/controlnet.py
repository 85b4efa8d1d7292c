"""ControlNets (SD 1.x / 2.x) -> Core ML, Apple's interface: `sample`, `timestep`, `encoder_hidden_states`
((B, C, 1, S) layout) and `controlnet_cond` (B, 3, 8h, 8w) in [0, 1] -> `additional_residual_0..N-1`, the
residuals the controlled UNet (--unet-support-controlnet) takes under the same names. One package per
ControlNet, ControlNet_<name>.mlpackage ('/' -> '_'), at the latent size and batch of the model's UNet."""
from pathlib import Path

import torch

from ..components import SD, TABLE, Dims, interface_of, residual_shapes, with_residuals
from ..controlnets import resolve_controlnet
from ..errors import UserError
from ..layers.unet import DiffusersControlNet
from .common import convert_traced_component, kept_existing
from .unet import DESCRIPTIONS, check_controlled_sizes, latent_size, sample_inputs, text_sequence_length

CONTROLNET_DESCRIPTIONS = {
    **{k: DESCRIPTIONS[k] for k in ("sample", "timestep", "encoder_hidden_states")},
    "controlnet_cond": "The condition image (edges, depth, pose...), NCHW in [0, 1], at 8x the latent size",
}
RESIDUAL_DESCRIPTION = "A residual for the controlled UNet's input of the same name (scale it to weaken the control)"


def output_paths(options) -> list:
    return [Path(options.output_dir) / TABLE["controlnet"].package_name(name) for name in options.controlnets]


def check_request(source, options) -> None:
    """Before any conversion: each ControlNet exists and fits the model's UNet."""
    unet_config = source.config("unet")
    if interface_of(unet_config) != SD:
        raise UserError(f"--convert-controlnet: {source.name!r} is SDXL's; SDXL ControlNets run on the pipeline's "
                        "torch backend only for now, and convert for SD 1.x / 2.x models")
    for name in options.controlnets:
        resolve_controlnet(name).check_fits(unet_config, source.name)
    check_controlled_sizes(options)


def controlnet_dims(unet_config: dict, batch: int, h: int, w: int, seq_len: int) -> Dims:
    return Dims(h, w, batch, unet_config.get("in_channels", 4), unet_config["cross_attention_dim"], seq_len,
                residuals=residual_shapes(unet_config, h, w))


def example_inputs(unet_config: dict, batch: int, h: int, w: int, seq_len: int) -> dict:
    inputs = sample_inputs(unet_config, batch, h, w, seq_len)
    (*_, cond) = TABLE["controlnet"].shapes(controlnet_dims(unet_config, batch, h, w, seq_len))
    inputs["controlnet_cond"] = torch.rand(*cond, generator=torch.Generator().manual_seed(2))
    return inputs


def enumerated_shapes(unet_config: dict, dims: Dims, options) -> dict:
    """The ControlNet inputs' enumerated shapes: each --latent-sizes size (its residuals) by 1..--max-prompt-chunks
    windows, as the controlled UNet's, so that the two pair variant by variant; {} for one shape."""
    variants = with_residuals(dims.variants(options.sizes_or(unet_config["sample_size"]), options.max_prompt_chunks),
                              unet_config)
    return TABLE["controlnet"].enumerated_shapes(variants, SD)


def convert_controlnets(source, options) -> list:
    unet_config = source.config("unet")
    batch, (h, w) = 1 if options.unet_batch_one else 2, latent_size(unet_config, options)
    inputs = example_inputs(unet_config, batch, h, w, text_sequence_length(source, options))
    dims = controlnet_dims(unet_config, batch, h, w, inputs["encoder_hidden_states"].shape[-1])
    outputs, enumerated = TABLE["controlnet"].io(SD).output_names(dims), enumerated_shapes(unet_config, dims, options)
    written = []
    for name, out in zip(options.controlnets, output_paths(options)):
        if not kept_existing([out], options, "controlnet"):
            module = DiffusersControlNet(resolve_controlnet(name).load())
            convert_traced_component(module, inputs, list(outputs), options, "controlnet",
                                     {**CONTROLNET_DESCRIPTIONS, **dict.fromkeys(outputs, RESIDUAL_DESCRIPTION)},
                                     enumerated=enumerated, out=out)
        written.append(out)
    return written
