"""VAE decoder and encoder -> Core ML, with the input/output names Apple's pipelines expect.

Decoder: `z` (1, 4, h, w) -> `image` (1, 3, 8h, 8w) in [-1, 1]; the caller divides latents by the
scaling factor first, as Apple's pipelines do.
Encoder (img2img), Apple's current interface: `x` (1, 3, 8h, 8w) image in [-1, 1] -> `latent`
(1, 2 * latent_channels, h, w), the posterior's moments: mean and log-variance concatenated on channels
(diffusers' `vae.encode(x).latent_dist.parameters`). The pipeline samples the posterior itself
(Core ML has no random op): see python_coreml_sd.generation.pipeline.sample_posterior.
fp16: a VAE whose activations overflow fp16 (SDXL's) is converted with its residual stream scaled by a power
of two, which is exact: see vae_fp16.
"""
from collections import OrderedDict

import torch

from ..components import TABLE, Dims
from .common import convert_traced_component, kept_existing, output_path
from .vae_fp16 import fp16_safe

DECODER_DESCRIPTIONS = {
    "z": "Denoised latents from the last diffusion step, divided by the VAE scaling factor",
    "image": "Generated image, NCHW, in [-1, 1]",
}
ENCODER_DESCRIPTIONS = {
    "x": "Input image, NCHW, in [-1, 1], at 8x the latent size",
    "latent": "Moments of the VAE posterior: mean and log-variance concatenated on channels (unscaled)",
}


class VAEDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class VAEEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


def latent_sizes(source, options) -> tuple:
    """Every latent size to convert for (--latent-sizes), the default first: the flags', else the model's."""
    size = (source.config("unet", ("sample_size",))["sample_size"] if source.has("unet")
            else source.config("vae", ("sample_size",))["sample_size"] // 8)
    return options.sizes_or(size)


def decoder_inputs(vae, h, w, seed=0):
    """Scaled as the decoder's real input: latents (about unit variance) divided by the scaling factor, so that
    the fp16 range is chosen (vae_fp16) and checked (--check-output-correctness) at the values it will see."""
    generator = torch.Generator().manual_seed(seed)
    (z,) = TABLE["vae_decoder"].shapes(Dims(h, w, latent_channels=vae.config.latent_channels))
    return OrderedDict(z=torch.randn(*z, generator=generator) / vae.config.scaling_factor)


def encoder_inputs(vae, h, w, seed=0):
    generator = torch.Generator().manual_seed(seed)
    (x,) = TABLE["vae_encoder"].shapes(Dims(h, w))
    return OrderedDict(x=torch.rand(*x, generator=generator) * 2 - 1)


# The metadata key of the powers of two the residual stream's segments are divided by (absent: not scaled).
STREAM_SCALE_KEY = "com.python_coreml_sd.vae_stream_scale"


def _convert(source, options, component, make_module, part_name, make_inputs, descriptions) -> list:
    if kept_existing([output_path(options, component)], options, component):
        return [output_path(options, component)]
    vae = source.load_vae()
    sizes = latent_sizes(source, options)
    inputs = make_inputs(vae, *sizes[0])
    variants = Dims(*sizes[0], latent_channels=vae.config.latent_channels).variants(sizes)
    module, scales = make_module(vae).eval(), None
    if options.compute_precision == "float16":
        module, scales = fp16_safe(module, part_name, tuple(inputs.values()), component)
    return convert_traced_component(module, inputs, list(TABLE[component].outputs), options,
                                    component, descriptions, enumerated=TABLE[component].enumerated_shapes(variants),
                                    metadata={STREAM_SCALE_KEY: ",".join(map(str, scales))} if scales else None)


def convert_vae_decoder(source, options) -> list:
    return _convert(source, options, "vae_decoder", VAEDecoder, "decoder", decoder_inputs, DECODER_DESCRIPTIONS)


def convert_vae_encoder(source, options) -> list:
    return _convert(source, options, "vae_encoder", VAEEncoder, "encoder", encoder_inputs, ENCODER_DESCRIPTIONS)
