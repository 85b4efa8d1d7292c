"""VAE decoder and encoder -> Core ML, with the input/output names Apple's pipelines expect.

Decoder: `z` (1, 4, h, w) -> `image` (1, 3, 8h, 8w) in [-1, 1]; the caller divides latents by the
scaling factor first, as Apple's pipelines do.
Encoder (img2img): `sample` image in [-1, 1], the Gaussian noise for sampling the posterior
(`diagonal_noise`), the scheduler noise (`noise`) and the strength's `sqrt_alphas_cumprod` /
`sqrt_one_minus_alphas_cumprod` -> `latent_dist`, the noised, scaled starting latents. Core ML has no
random op, so all noise comes in as inputs.
"""
from collections import OrderedDict

import torch

from .common import convert_traced_component, kept_existing, output_path

DECODER_DESCRIPTIONS = {
    "z": "Denoised latents from the last diffusion step, divided by the VAE scaling factor",
    "image": "Generated image, NCHW, in [-1, 1]",
}
ENCODER_DESCRIPTIONS = {
    "sample": "Input image, NCHW, in [-1, 1], at 8x the latent size",
    "diagonal_noise": "Standard normal noise that samples the VAE posterior",
    "noise": "Standard normal noise added at the strength's timestep",
    "sqrt_alphas_cumprod": "sqrt(alphas_cumprod[t]) of the scheduler at the strength's first timestep",
    "sqrt_one_minus_alphas_cumprod": "sqrt(1 - alphas_cumprod[t]) of the scheduler at that timestep",
    "latent_dist": "Noised, scaled latents that start the img2img denoising",
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
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, sample, diagonal_noise, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
        mean, logvar = self.quant_conv(self.encoder(sample)).chunk(2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        latents = self.scaling_factor * (mean + std * diagonal_noise)
        return sqrt_alphas_cumprod * latents + sqrt_one_minus_alphas_cumprod * noise


def latent_size(source, options) -> tuple:
    size = (source.config("unet", ("sample_size",))["sample_size"] if source.has("unet")
            else source.config("vae", ("sample_size",))["sample_size"] // 8)
    return options.latent_h or size, options.latent_w or size


def decoder_inputs(vae, h, w):
    generator = torch.Generator().manual_seed(0)
    return OrderedDict(z=torch.randn(1, vae.config.latent_channels, h, w, generator=generator))


def encoder_inputs(vae, h, w):
    generator = torch.Generator().manual_seed(0)
    latent = (1, vae.config.latent_channels, h, w)
    return OrderedDict(
        sample=torch.rand(1, vae.config.in_channels, 8 * h, 8 * w, generator=generator) * 2 - 1,
        diagonal_noise=torch.randn(*latent, generator=generator),
        noise=torch.randn(*latent, generator=generator),
        sqrt_alphas_cumprod=torch.tensor([[0.6]]),
        sqrt_one_minus_alphas_cumprod=torch.tensor([[0.8]]),
    )


def _convert(source, options, component, make_module, make_inputs, descriptions) -> list:
    if kept_existing([output_path(options, component)], options, component):
        return [output_path(options, component)]
    vae = source.load_vae()
    inputs = make_inputs(vae, *latent_size(source, options))
    output_names = [name for name in descriptions if name not in inputs]
    return convert_traced_component(make_module(vae).eval(), inputs, output_names, options, component, descriptions)


def convert_vae_decoder(source, options) -> list:
    return _convert(source, options, "vae_decoder", VAEDecoder, decoder_inputs, DECODER_DESCRIPTIONS)


def convert_vae_encoder(source, options) -> list:
    return _convert(source, options, "vae_encoder", VAEEncoder, encoder_inputs, ENCODER_DESCRIPTIONS)
