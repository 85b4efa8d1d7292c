"""Inpainting (issue 19): the tiny inpainting UNet (9 input channels) converted with each attention implementation
against diffusers, generation with --image and --mask against diffusers' StableDiffusionInpaintPipeline and across
backends, and bad input refused in one line, exit 2, nothing written."""
import numpy as np
import pytest
import torch
from PIL import Image

from python_coreml_sd.components import SD, TABLE, Dims, is_inpainting, sample_dims
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.setup import open_pipeline
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.runtime import load_model
from tests.support import assert_one_line, converted, run_pipeline_cli

MODEL = "tiny-inpaint"
STEPS = 4
ATTENTIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
UNET_PACKAGE = f"Stable_Diffusion_version_{MODEL}_unet.mlpackage"


@pytest.fixture(scope="module")
def source():
    return resolve(MODEL)


def convert_to(out, components, **options):
    return converted(MODEL, out, components, **options)


@pytest.fixture(scope="module")
def fp32_unets(tmp_path_factory):
    return {attention: convert_to(tmp_path_factory.mktemp(f"inpaint_{attention}"), ["unet"], compute_precision="float32",
                                  attention_implementation=attention)[UNET_PACKAGE] for attention in ATTENTIONS}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("inpaint_fp16")
    convert_to(out, ["text_encoder", "vae_decoder", "vae_encoder", "unet"])
    return out


def test_tiny_inpaint_is_recognised_from_its_config(source):
    config = source.config("unet")
    assert config["in_channels"] == 9 and is_inpainting(config) and not is_inpainting(resolve("tiny").config("unet"))
    shapes = TABLE["unet"].input_shapes(Dims(16, 16, text_hidden=32, **sample_dims(config)), SD)
    assert shapes["sample"] == (2, 9, 16, 16)  # latents 4 + mask 1 + masked-image latents 4
    assert source.pipeline_class == "StableDiffusionInpaintPipeline"


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_inpainting_unet_package_matches_diffusers_fp32(fp32_unets, attention, source):
    from python_coreml_sd.convert.unet import diffusers_reference, sample_inputs
    from python_coreml_sd.generation.components import _package_inputs
    unet = source.load_unet()
    inputs = sample_inputs(dict(unet.config), 2, 16, 16, 77)
    assert tuple(inputs["sample"].shape) == (2, 9, 16, 16)
    assert _package_inputs(fp32_unets[attention])[0]["sample"] == (2, 9, 16, 16)  # Apple's name, 9 channels
    out = load_model(fp32_unets[attention], backend="mil").predict({k: v.numpy() for k, v in inputs.items()})
    reference = diffusers_reference(unet, inputs)
    assert out["noise_pred"].shape == (2, 4, 16, 16)
    assert psnr(reference, out["noise_pred"]) >= 45
    # the mask and masked-image channels reach the output
    other = dict(inputs, sample=torch.cat([inputs["sample"][:, :4], torch.zeros(2, 5, 16, 16)], dim=1))
    assert psnr(reference, diffusers_reference(unet, other)) < 30


@pytest.fixture(scope="module")
def pipes(models_dir):
    return {backend: open_pipeline(backend, models_dir, model_version=MODEL, progress=False)
            for backend in ("mil", "torch")}


def request_with(image, mask, **kwargs):
    return GenerationRequest(prompt="a cat on a bench", seed=5, num_inference_steps=STEPS, image=image, mask=mask,
                             **kwargs)


def diffusers_inpaint(source, request, pipeline_class=None, **extra):
    """diffusers' inpaint pipeline (SD: StableDiffusionInpaintPipeline; else `pipeline_class`) with our random
    draws (RandomSource: the initial latents, then the masked image's posterior noise), everything else its own:
    mask and image preprocessing, the masked image, its encoding, the concatenation per step.
    Returns (final latents, the mask at latent size, the masked image's latents)."""
    from diffusers import StableDiffusionInpaintPipeline
    pipe = (pipeline_class or StableDiffusionInpaintPipeline).from_pretrained(str(source.root), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    draws = np.random.RandomState(request.seed)
    start, posterior_noise = (torch.from_numpy(draws.randn(1, 4, 16, 16).astype(np.float32)) for _ in range(2))
    image = pipe.image_processor.preprocess(request.image, height=128, width=128)
    mask = pipe.mask_processor.preprocess(request.mask, height=128, width=128)
    with torch.no_grad():
        posterior = pipe.vae.encode(image * (mask < 0.5)).latent_dist
        masked_latents = pipe.vae.config.scaling_factor * (posterior.mean + posterior.std * posterior_noise)
        latents = pipe(request.prompt, image=request.image, mask_image=request.mask, masked_image_latents=masked_latents,
                       latents=start, num_inference_steps=request.num_inference_steps, height=128, width=128,
                       guidance_scale=request.guidance_scale, output_type="latent", **extra).images
    small_mask = torch.nn.functional.interpolate(mask, size=(16, 16))
    return latents.numpy(), small_mask.numpy(), masked_latents.numpy()


def test_torch_loop_is_diffusers_inpaint_pipeline(pipes, source, picture, mask):
    request = request_with(picture, mask)
    assert pipes["torch"].with_default_strength(request).strength == 1  # StableDiffusionInpaintPipeline's default
    ours = pipes["torch"].generate(request).intermediates
    latents, small_mask, masked_latents = diffusers_inpaint(source, request)
    assert np.array_equal(ours["mask"], small_mask) and 0 < small_mask.mean() < 1
    assert psnr(masked_latents, ours["masked_image_latents"]) >= 60
    assert psnr(latents, ours["final_latents"]) >= 60, psnr(latents, ours["final_latents"])


def test_mil_matches_torch_and_the_mask_steers(pipes, picture, mask):
    mil, reference = (pipes[b].generate(request_with(picture, mask)) for b in ("mil", "torch"))
    assert psnr(np.asarray(reference.image, np.float32), np.asarray(mil.image, np.float32)) >= 30
    assert psnr(reference.intermediates["final_latents"], mil.intermediates["final_latents"]) >= 30
    other = pipes["torch"].generate(request_with(picture, mask.rotate(90))).intermediates["final_latents"]
    assert psnr(reference.intermediates["final_latents"], other) < 60  # fp32 torch repeats itself to > 100 dB
    # strength below 1: the img2img start (the image's latents noised), then the same mask inputs
    partial = [pipes[b].generate(request_with(picture, mask, strength=0.5)).intermediates["final_latents"]
               for b in ("mil", "torch")]
    assert psnr(partial[1], partial[0]) >= 30 and psnr(partial[1], reference.intermediates["final_latents"]) < 60


def test_cli_inpaints_with_the_torch_backend(capsys, tmp_path, picture, mask):
    from python_coreml_sd import pipeline as pipeline_cli
    picture.save(tmp_path / "image.png"), mask.save(tmp_path / "mask.png")
    assert pipeline_cli.main(["--prompt", "a cat", "--model-version", MODEL, "--backend", "torch", "--image",
                              str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--num-inference-steps",
                              "2", "-o", str(tmp_path / "out")]) == 0
    (png,) = (tmp_path / "out").iterdir()
    assert Image.open(png).size == (128, 128) and Image.open(png).text["inpainting"] == "True"


@pytest.mark.parametrize("model, flags, fragments", [
    (MODEL, ["--mask", "mask.png"], ["--mask needs --image"]),
    (MODEL, ["--image", "image.png", "--mask", "small.png"], ["--mask is 64x64 but --image is 128x128"]),
    ("tiny", ["--image", "image.png", "--mask", "mask.png"], ["--mask needs an inpainting UNet", "ControlNet inpaint"]),
    (MODEL, ["--image", "image.png"], ["inpainting UNet", "--mask MASK"]),
    (MODEL, [], ["inpainting UNet", "--mask MASK"]),
])
def test_bad_inpainting_input_is_refused_in_one_line(capsys, tmp_path, picture, mask, model, flags, fragments):
    picture.save(tmp_path / "image.png"), mask.save(tmp_path / "mask.png"), mask.resize((64, 64)).save(tmp_path / "small.png")
    code, err = run_pipeline_cli(capsys, "--prompt", "a cat", "--model-version", model, "--backend", "torch",
                                 *[str(tmp_path / f) if f.endswith(".png") else f for f in flags],
                                 "--num-inference-steps", "1", "-o", str(tmp_path / "out"))
    assert_one_line(code, err, *fragments)
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_converter_refuses_a_unet_of_other_input_channels(tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from python_coreml_sd import registry, torch2coreml
    from python_coreml_sd.random_models import build_components, save_diffusers_folder
    components = build_components("tiny")
    components["unet"] = UNet2DConditionModel(**dict(registry.family("tiny")["architecture"]["unet"], in_channels=8))
    save_diffusers_folder(components, tmp_path / "pix2pix")
    capsys.readouterr()  # what building the model printed (transformers' notices)
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--model-version", str(tmp_path / "pix2pix"), "--convert-unet", "-o", str(tmp_path / "out")])
    assert_one_line(exit_info.value.code, capsys.readouterr().err.strip(), "8 input channels", "9 (inpainting)",
                    prog="torch2coreml")
    assert not (tmp_path / "out").exists()


def test_sdxl_inpainting_models_bundle_for_swift(tmp_path):
    """The Swift SDXL pipeline inpaints too: a bundle of tiny-xl-inpaint holds its 9-channel UNet as Unet."""
    from python_coreml_sd import torch2coreml
    assert torch2coreml.main(["--model-version", "tiny-xl-inpaint", "--convert-unet", "--convert-vae-encoder",
                              "--bundle-packages", "-o", str(tmp_path)]) == 0
    resources = tmp_path / "Resources"
    assert {p.name for p in resources.glob("*.mlpackage")} == {"Unet.mlpackage", "VAEEncoder.mlpackage"}
    from python_coreml_sd.generation.components import _package_inputs
    assert _package_inputs(resources / "Unet.mlpackage")[0]["sample"] == (2, 9, 16, 16)


# ---- SDXL: tiny-xl-inpaint, its UNet's sample (2, 9, 16, 16) after SDXL's added conditions' interface

XL = "tiny-xl-inpaint"


@pytest.fixture(scope="module")
def xl_models_dir(tmp_path_factory):
    """tiny-xl-inpaint fp32 (the comparison with diffusers is of the UNet package too), both text encoders."""
    out = tmp_path_factory.mktemp("xl_inpaint")
    convert(ConversionOptions(model_version=XL, output_dir=out, compute_precision="float32"),
            ["text_encoder", "vae_decoder", "vae_encoder", "unet"])
    return out


@pytest.fixture(scope="module")
def xl_pipes(xl_models_dir):
    return {backend: open_pipeline(backend, xl_models_dir, model_version=XL, progress=False)
            for backend in ("mil", "torch")}


def test_xl_inpainting_unet_package_has_nine_channels(xl_models_dir):
    from python_coreml_sd.generation.components import _package_inputs
    shapes = _package_inputs(xl_models_dir / f"Stable_Diffusion_version_{XL}_unet.mlpackage")[0]
    assert tuple(shapes) == TABLE["unet"].io("sdxl").inputs and shapes["sample"] == (2, 9, 16, 16)


def test_xl_torch_loop_is_diffusers_and_mil_matches(xl_pipes, picture, mask):
    request = request_with(picture, mask, scheduler="EulerDiscrete", guidance_scale=5.0, strength=1.0)
    ours = xl_pipes["torch"].generate(request)
    from diffusers import StableDiffusionXLInpaintPipeline
    reference = diffusers_inpaint(resolve(XL), request, StableDiffusionXLInpaintPipeline, strength=1.0)[0]
    assert psnr(reference, ours.intermediates["final_latents"]) >= 60
    mil = xl_pipes["mil"].generate(request)
    assert psnr(ours.intermediates["final_latents"], mil.intermediates["final_latents"]) >= 40  # fp32 packages


def diffusers_xl_inpaint_default_strength(request) -> np.ndarray:
    """Final latents of StableDiffusionXLInpaintPipeline at its default strength (0.9999: the image's latents noised
    to the first kept timestep, one step fewer) with our draws: RandomSource's img2img pair (the image's posterior
    noise, then the noise) and the masked image's posterior noise; the VAE encodings and the noising are diffusers'."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as module
    pipe = module.StableDiffusionXLInpaintPipeline.from_pretrained(str(resolve(XL).root), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    draws = np.random.RandomState(request.seed)
    image_noise, noise, masked_noise = (torch.from_numpy(draws.randn(1, 4, 16, 16).astype(np.float32)) for _ in range(3))
    scale = pipe.vae.config.scaling_factor

    def sample(image, posterior_noise):
        posterior = pipe.vae.encode(image).latent_dist
        return scale * (posterior.mean + posterior.std * posterior_noise)

    image = pipe.image_processor.preprocess(request.image, height=128, width=128)
    mask = pipe.mask_processor.preprocess(request.mask, height=128, width=128)
    pipe._encode_vae_image = lambda image, generator: sample(image, image_noise)
    original = module.randn_tensor
    module.randn_tensor = lambda shape, **kwargs: noise
    try:
        with torch.no_grad():
            return pipe(request.prompt, image=request.image, mask_image=request.mask, height=128, width=128,
                        masked_image_latents=sample(image * (mask < 0.5), masked_noise),
                        num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                        output_type="latent").images.numpy()
    finally:
        module.randn_tensor = original


def test_xl_default_strength_is_diffusers(xl_pipes, picture, mask):
    """No --strength with a mask: SDXL's inpainting default, 0.9999 (diffusers'), not SD's 1."""
    import inspect
    from diffusers import StableDiffusionXLInpaintPipeline
    request = request_with(picture, mask, scheduler="EulerDiscrete", guidance_scale=5.0)
    default = inspect.signature(StableDiffusionXLInpaintPipeline.__call__).parameters["strength"].default
    assert request.strength is None and xl_pipes["torch"].with_default_strength(request).strength == default < 1
    ours = xl_pipes["torch"].generate(request).intermediates["final_latents"]
    assert psnr(diffusers_xl_inpaint_default_strength(request), ours) >= 60
    at_one = xl_pipes["torch"].generate(request_with(picture, mask, scheduler="EulerDiscrete", guidance_scale=5.0,
                                                     strength=1.0)).intermediates["final_latents"]
    assert psnr(ours, at_one) < 60  # the default is not strength 1's result


def test_chunked_inpainting_unet_generates_as_the_whole(tmp_path, models_dir, pipes, picture, mask):
    """--chunk-unet: chunk 1 takes the 9-channel sample; the pipeline, fed by name, gives the whole UNet's result."""
    from python_coreml_sd.components import component_of
    from python_coreml_sd.generation.components import _package_inputs
    paths = {component_of(p): p for p in convert_to(tmp_path / "chunked", ["unet"], chunk_unet=True).values()}
    assert _package_inputs(paths["unet_chunk1"])[0]["sample"] == (2, 9, 16, 16)
    folder = tmp_path / "models"
    folder.mkdir()
    for path in [*(p for p in models_dir.iterdir() if component_of(p) != "unet"), paths["unet_chunk1"],
                 paths["unet_chunk2"]]:
        (folder / path.name).symlink_to(path)
    chunked = open_pipeline("mil", folder, model_version=MODEL, progress=False)
    assert "unet" not in chunked.models and chunked.inpaint
    whole, parts = (p.generate(request_with(picture, mask)).intermediates["final_latents"] for p in (pipes["mil"], chunked))
    # fp16 rounding apart: the chunk boundary hands NCHW arrays to layers that get channels-last tensors in the
    # whole (1x1 convolutions run as channels-last GEMMs), 59.3 dB measured
    assert psnr(whole, parts) >= 55


def test_parity_covers_the_masked_image_latents(tmp_path, models_dir, picture, mask):
    from python_coreml_sd.generation.jobs import Models, ParityJob, run_parity
    job = ParityJob(Models("mil", models_dir, MODEL), [request_with(picture, mask)], tmp_path / "parity")
    report = run_parity(job)
    values = report["results"][0]["psnr_db"]
    assert report["passed"] and {"masked_image_latents", "final_latents", "final_image"} <= set(values), values
