"""VAE decoder and encoder -> Core ML, with the input/output names Apple's pipelines expect.

Decoder: `z` (1, 4, h, w) -> `image` (1, 3, 8h, 8w) in [-1, 1]; the caller divides latents by the
scaling factor first, as Apple's pipelines do.
Encoder (img2img), Apple's current interface: `x` (1, 3, 8h, 8w) image in [-1, 1] -> `latent`
(1, 2 * latent_channels, h, w), the posterior's moments: mean and log-variance concatenated on channels
(diffusers' `vae.encode(x).latent_dist.parameters`). The pipeline samples the posterior itself
(Core ML has no random op): see python_coreml_sd.generation.pipeline.sample_posterior.
"""
from collections import OrderedDict

import torch

from ..components import TABLE, Dims
from .common import convert_traced_component, kept_existing, output_path

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


def decoder_inputs(vae, h, w):
    generator = torch.Generator().manual_seed(0)
    (z,) = TABLE["vae_decoder"].shapes(Dims(h, w, latent_channels=vae.config.latent_channels))
    return OrderedDict(z=torch.randn(*z, generator=generator))


def encoder_inputs(vae, h, w):
    generator = torch.Generator().manual_seed(0)
    (x,) = TABLE["vae_encoder"].shapes(Dims(h, w))
    return OrderedDict(x=torch.rand(*x, generator=generator) * 2 - 1)


def _convert(source, options, component, make_module, make_inputs, descriptions) -> list:
    if kept_existing([output_path(options, component)], options, component):
        return [output_path(options, component)]
    vae = source.load_vae()
    sizes = latent_sizes(source, options)
    inputs = make_inputs(vae, *sizes[0])
    variants = Dims(*sizes[0], latent_channels=vae.config.latent_channels).variants(sizes)
    return convert_traced_component(make_module(vae).eval(), inputs, list(TABLE[component].outputs), options,
                                    component, descriptions, enumerated=TABLE[component].enumerated_shapes(variants))


def convert_vae_decoder(source, options) -> list:
    return _convert(source, options, "vae_decoder", VAEDecoder, decoder_inputs, DECODER_DESCRIPTIONS)


def convert_vae_encoder(source, options) -> list:
    return _convert(source, options, "vae_encoder", VAEEncoder, encoder_inputs, ENCODER_DESCRIPTIONS)
