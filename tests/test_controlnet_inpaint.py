"""The ControlNet inpaint route (issue 19) for ordinary 4-channel UNets: `--image --mask --controlnet INPAINT_NET`
as diffusers' StableDiffusionControlNetInpaintPipeline: the ControlNet sees the image with the masked pixels set
to -1 (diffusers' make_inpaint_condition), and after each step the latents outside the mask are the image's,
re-noised. The torch loop against diffusers (same draws), mil against torch, and bad input in one line."""
import numpy as np
import pytest
import torch

from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.setup import open_pipeline
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from tests.support import assert_one_line, run_pipeline_cli

NAME = "tiny-controlnet"  # random weights: it stands for an inpaint ControlNet (the same architecture)
STEPS = 4


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("controlnet_inpaint")
    convert(ConversionOptions(model_version="tiny", output_dir=out, controlnets=(NAME,), unet_support_controlnet=True),
            ["text_encoder", "vae_decoder", "vae_encoder", "unet", "controlnet"])
    return out


@pytest.fixture(scope="module")
def torch_pipe():
    return open_pipeline("torch", progress=False, controlnet=NAME)


def request_with(image, mask, **kwargs):
    return GenerationRequest(prompt="a cat on a bench", seed=3, num_inference_steps=STEPS, image=image, mask=mask,
                             **kwargs)


def make_inpaint_condition(image, mask) -> torch.Tensor:
    """diffusers' documented control image for inpaint ControlNets (ControlNet inpainting docs)."""
    image = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    mask = np.array(mask.convert("L")).astype(np.float32) / 255.0
    image[mask > 0.5] = -1.0
    return torch.from_numpy(np.expand_dims(image, 0).transpose(0, 3, 1, 2))


def diffusers_controlnet_inpaint(request) -> tuple:
    """(final latents, the image's latents) of diffusers' StableDiffusionControlNetInpaintPipeline with our draws
    (RandomSource: the initial latents, then the image's posterior noise; the VAE's encoding is diffusers')."""
    from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline
    from python_coreml_sd.controlnets import resolve_controlnet
    controlnet = ControlNetModel.from_pretrained(str(resolve_controlnet(NAME).root))
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(str(resolve("tiny").root), controlnet=controlnet,
                                                                    use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    draws = np.random.RandomState(request.seed)
    start, posterior_noise = (torch.from_numpy(draws.randn(1, 4, 16, 16).astype(np.float32)) for _ in range(2))
    encoded = []

    def encode(image, generator):  # its posterior sampled with our draw (the masked image's is unused at 4 channels)
        posterior = pipe.vae.encode(image).latent_dist
        encoded.append(pipe.vae.config.scaling_factor * (posterior.mean + posterior.std * posterior_noise))
        return encoded[-1]

    pipe._encode_vae_image = encode
    with torch.no_grad():
        latents = pipe(request.prompt, image=request.image, mask_image=request.mask,
                       control_image=make_inpaint_condition(request.image, request.mask), latents=start,
                       num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                       height=128, width=128, controlnet_conditioning_scale=1.0, output_type="latent").images
    return latents.numpy(), encoded[0].numpy()


def test_torch_loop_is_diffusers_controlnet_inpaint_pipeline(torch_pipe, picture, mask):
    request = request_with(picture, mask)
    ours = torch_pipe.generate(request).intermediates
    latents, image_latents = diffusers_controlnet_inpaint(request)
    assert psnr(image_latents, ours["image_latents"]) >= 60
    assert psnr(latents, ours["final_latents"]) >= 60, psnr(latents, ours["final_latents"])
    keep = np.broadcast_to(ours["mask"] == 0, latents.shape)
    assert 0 < keep.mean() < 1
    # outside the mask the last blend leaves the image's latents as they are; inside, the UNet repainted
    assert np.array_equal(ours["final_latents"][keep], ours["image_latents"][keep])
    assert not np.allclose(ours["final_latents"][~keep], ours["image_latents"][~keep], atol=0.1)


def test_the_inpaint_condition_steers_the_controlnet(torch_pipe, picture, mask):
    request = request_with(picture, mask)
    default = torch_pipe.generate(request).intermediates["final_latents"]
    other = torch_pipe.generate(request_with(picture, mask, control_image=picture)).intermediates["final_latents"]
    assert psnr(default, other) < 60  # fp32 torch repeats a computation to > 100 dB


def test_mil_matches_torch_on_the_controlnet_inpaint_route(models_dir, torch_pipe, picture, mask):
    mil = open_pipeline("mil", models_dir, progress=False, controlnet=NAME)
    for strength in (1.0, 0.5):
        request = request_with(picture, mask, strength=strength)
        ours, reference = (p.generate(request).intermediates["final_latents"] for p in (mil, torch_pipe))
        assert psnr(reference, ours) >= 30, (strength, psnr(reference, ours))


def test_bad_controlnet_inpaint_input_is_refused_in_one_line(capsys, tmp_path, picture, mask):
    picture.save(tmp_path / "image.png"), mask.save(tmp_path / "mask.png")
    code, err = run_pipeline_cli(capsys, "--prompt", "a cat", "--backend", "torch", "--image", str(tmp_path / "image.png"),
                                 "--mask", str(tmp_path / "mask.png"), "--controlnet", NAME, "tiny-controlnet-2",
                                 "--num-inference-steps", "1", "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "--controlnet needs --control-image")
    code, err = run_pipeline_cli(capsys, "--prompt", "a cat", "--backend", "torch", "--model-version", "tiny-inpaint",
                                 "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
                                 "--controlnet", NAME, "--num-inference-steps", "1", "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "another model family", "in_channels")
    assert not (tmp_path / "out").exists()
