"""ControlNet (issue 19, SD 1.x / 2.x): the tiny ControlNet, its package and the controlled UNet's against
diffusers (MIL runtime vs PyTorch fp32), generation with a control image on the mil and torch backends, and
bad input refused in one line."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from python_coreml_sd import torch2coreml
from python_coreml_sd.components import RESIDUAL, SD, TABLE, Dims, residual_shapes
from python_coreml_sd.controlnets import resolve_controlnet
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.setup import open_pipeline
from python_coreml_sd.metrics import psnr
from python_coreml_sd.runtime import load_model
from tests.support import assert_one_line, converted, run_pipeline_cli

NAME = "tiny-controlnet"
STEPS = 4
ATTENTIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")


@pytest.fixture(scope="module")
def controlnet():
    return resolve_controlnet(NAME)


def convert_to(out, components, **options):
    return converted("tiny", out, components, **options)


@pytest.fixture(scope="module")
def fp32_packages(tmp_path_factory):
    """The ControlNet and the controlled UNet (each attention implementation), fp32."""
    packages = {}
    for attention in ATTENTIONS:
        out = tmp_path_factory.mktemp(f"controlnet_{attention}")
        found = convert_to(out, ["unet"] + (["controlnet"] if not packages else []), compute_precision="float32",
                           attention_implementation=attention, controlnets=() if packages else (NAME,),
                           unet_support_controlnet=True)
        packages[attention] = found["Stable_Diffusion_version_tiny_control-unet.mlpackage"]
        packages.setdefault("controlnet", found.get(f"ControlNet_{NAME}.mlpackage"))  # Apple's file name
    return packages


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """fp16 packages for generation: text encoder, VAE decoder, plain and controlled UNet, the ControlNet."""
    out = tmp_path_factory.mktemp("controlnet_fp16")
    convert_to(out, ["text_encoder", "vae_decoder", "unet", "controlnet"], controlnets=(NAME,))
    convert_to(out, ["unet"], unet_support_controlnet=True)
    return out


def run(package, inputs: dict) -> dict:
    return load_model(package, backend="mil").predict({k: np.asarray(v, np.float32) for k, v in inputs.items()})


def example(seed=0):
    from python_coreml_sd.convert.controlnet import example_inputs
    config = resolve_unet_config()
    inputs = example_inputs(config, 2, 16, 16, 77)
    inputs["encoder_hidden_states"] = torch.randn(inputs["encoder_hidden_states"].shape,
                                                  generator=torch.Generator().manual_seed(seed))
    return inputs


def resolve_unet_config():
    from python_coreml_sd.model_sources import resolve
    return resolve("tiny").config("unet")


def test_tiny_controlnet_fits_the_tiny_unet_and_the_tables_residual_shapes(controlnet):
    diffusers_controlnet = controlnet.load()
    assert type(diffusers_controlnet).__name__ == "ControlNetModel"
    controlnet.check_fits(resolve_unet_config(), "tiny")
    inputs = example()
    with torch.no_grad():
        down, mid = diffusers_controlnet(inputs["sample"], inputs["timestep"],
                                         encoder_hidden_states=torch.randn(2, 77, 32),
                                         controlnet_cond=inputs["controlnet_cond"], return_dict=False)
    assert [tuple(t.shape[1:]) for t in (*down, mid)] == list(residual_shapes(resolve_unet_config(), 16, 16))
    assert all(t.abs().mean() > 1e-3 for t in (*down, mid))  # the zero convolutions were drawn: residuals move


def test_controlnet_package_matches_diffusers_fp32(fp32_packages, controlnet):
    from python_coreml_sd.layers.unet import DiffusersControlNet
    inputs = example(seed=3)
    with torch.no_grad():
        reference = DiffusersControlNet(controlnet.load())(*inputs.values())
    out = run(fp32_packages["controlnet"], {k: v.numpy() for k, v in inputs.items()})
    dims = Dims(16, 16, residuals=residual_shapes(resolve_unet_config(), 16, 16))
    assert tuple(out) == TABLE["controlnet"].io(SD).output_names(dims) == tuple(RESIDUAL.format(i) for i in range(7))
    for name, expected in zip(out, reference):
        assert out[name].shape == tuple(expected.shape)
        assert psnr(expected.numpy(), out[name]) >= 45, name


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_controlled_unet_matches_diffusers_with_residuals_fp32(fp32_packages, attention, tiny_source):
    """The converted UNet adds the residuals where diffusers' UNet2DConditionModel adds its
    down_block_additional_residuals and mid_block_additional_residual."""
    from python_coreml_sd.convert.unet import residual_inputs, sample_inputs
    unet = tiny_source.load_unet()
    inputs = sample_inputs(dict(unet.config), 2, 16, 16, 77)
    residuals = residual_inputs(dict(unet.config), inputs)
    states = inputs["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)
    with torch.no_grad():
        values = list(residuals.values())
        reference = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=states,
                         down_block_additional_residuals=values[:-1], mid_block_additional_residual=values[-1]).sample
        plain = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=states).sample
    out = run(fp32_packages[attention], {k: v.numpy() for k, v in {**inputs, **residuals}.items()})["noise_pred"]
    assert psnr(reference.numpy(), out) >= 45
    assert psnr(reference.numpy(), plain.numpy()) < 30  # the residuals reach the output


@pytest.fixture(scope="module")
def control_image():
    yy, xx = np.mgrid[0:128, 0:128]
    edges = ((xx // 16 + yy // 16) % 2 * 255).astype(np.uint8)  # a checkerboard "edge map"
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


@pytest.fixture(scope="module")
def pipes(models_dir):
    return {backend: open_pipeline(backend, models_dir, progress=False, controlnet=NAME) for backend in ("mil", "torch")}


def request_with(image, scale=1.0, **kwargs):
    return GenerationRequest(prompt="a house", seed=5, num_inference_steps=STEPS, control_image=image,
                             controlnet_scale=scale, **kwargs)


def test_mil_matches_torch_with_a_control_image(pipes, control_image):
    mil, reference = (pipes[b].generate(request_with(control_image)) for b in ("mil", "torch"))
    assert psnr(np.asarray(reference.image, np.float32), np.asarray(mil.image, np.float32)) >= 30
    assert psnr(reference.intermediates["final_latents"], mil.intermediates["final_latents"]) >= 30


def test_the_control_image_and_scale_steer_the_result(pipes, models_dir, control_image):
    torch_pipe = pipes["torch"]
    controlled = torch_pipe.generate(request_with(control_image)).intermediates["final_latents"]
    other = torch_pipe.generate(request_with(control_image.rotate(90))).intermediates["final_latents"]
    unscaled = torch_pipe.generate(request_with(control_image, 0.0)).intermediates["final_latents"]
    plain = open_pipeline("torch", models_dir, progress=False).generate(
        GenerationRequest(prompt="a house", seed=5, num_inference_steps=STEPS)).intermediates["final_latents"]
    # fp32 torch: the same computation repeats to > 100 dB, so 60 dB is a change the ControlNet made
    assert psnr(controlled, other) < 60 and psnr(controlled, plain) < 60, (psnr(controlled, other), psnr(controlled, plain))
    assert psnr(plain, unscaled) >= 90  # scale 0: the plain UNet's result
    # a control image of the same aspect ratio is resized
    resized = torch_pipe.generate(request_with(control_image.resize((64, 64)))).intermediates["final_latents"]
    assert resized.shape == controlled.shape


def test_pipeline_refuses_a_unet_without_controlnet_inputs(models_dir, tmp_path, capsys, control_image):
    plain = tmp_path / "plain"
    plain.mkdir()
    for package in models_dir.iterdir():
        if "control-unet" not in package.name:
            shutil.copytree(package, plain / package.name)
    control_image.save(tmp_path / "edges.png")
    code, err = run_pipeline_cli(capsys, "--prompt", "a house", "-i", str(plain), "--backend", "mil", "--controlnet",
                                 NAME, "--control-image", str(tmp_path / "edges.png"), "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "--unet-support-controlnet")


def test_pipeline_refuses_a_control_image_of_another_shape(models_dir, tmp_path, capsys, control_image):
    control_image.resize((128, 64)).save(tmp_path / "wide.png")
    code, err = run_pipeline_cli(capsys, "--prompt", "a house", "-i", str(models_dir), "--backend", "mil",
                                 "--controlnet", NAME, "--control-image", str(tmp_path / "wide.png"),
                                 "--num-inference-steps", "1", "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "--control-image is 128x64", "aspect ratio")


def convert_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_converter_refuses_a_controlnet_of_another_family(tmp_path, capsys):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from python_coreml_sd import registry
    sd2_unet = UNet2DConditionModel(**registry.family("tiny-sd2")["architecture"]["unet"])
    ControlNetModel.from_unet(sd2_unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).save_pretrained(
        str(tmp_path / "sd2-controlnet"))
    code, err = convert_cli(capsys, "--model-version", "tiny", "--convert-controlnet", str(tmp_path / "sd2-controlnet"),
                            "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "another model family", "cross_attention_dim", prog="torch2coreml")
    assert not (tmp_path / "out").exists()  # refused before any work
    code, err = convert_cli(capsys, "--model-version", "tiny", "--unet-support-controlnet", "--convert-text-encoder",
                            "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "--convert-unet", prog="torch2coreml")


@pytest.fixture(scope="module")
def chunked_controlled(models_dir, tmp_path_factory):
    """--unet-support-controlnet --chunk-unet, as models_dir's controlled UNet (fp16): the whole and its chunks."""
    whole, *chunks = convert(ConversionOptions("tiny", tmp_path_factory.mktemp("control_chunks"), chunk_unet=True,
                                               unet_support_controlnet=True), ["unet"])
    return whole, chunks


def test_chunked_controlled_unet_equals_the_whole(chunked_controlled):
    """Apple's names (control-unet_chunk1/2); each residual is an input of the one chunk whose ops add it, and
    chunk 1 then chunk 2 give the whole UNet's noise_pred."""
    from python_coreml_sd.components import component_of
    from python_coreml_sd.convert.unet import residual_inputs, sample_inputs
    whole, chunks = chunked_controlled
    assert [component_of(c) for c in chunks] == ["control-unet_chunk1", "control-unet_chunk2"]
    config = dict(resolve_unet_config())
    inputs = sample_inputs(config, 2, 16, 16, 77)
    inputs.update(residual_inputs(config, inputs))
    inputs = {name: value.numpy() for name, value in inputs.items()}
    first, second = (load_model(c, backend="mil") for c in chunks)
    taken = [{n for n in model.input_description if n.startswith(RESIDUAL.format(""))} for model in (first, second)]
    residuals = {n for n in inputs if n.startswith(RESIDUAL.format(""))}
    assert taken[0] | taken[1] == residuals and not taken[0] & taken[1]
    hidden = first.predict({k: v for k, v in inputs.items() if k in first.input_description})
    out = second.predict({k: v for k, v in {**inputs, **hidden}.items() if k in second.input_description})["noise_pred"]
    assert psnr(run(whole, inputs)["noise_pred"], out) >= 60


def test_pipeline_runs_the_chunked_controlled_unet_as_the_whole(chunked_controlled, models_dir, pipes, tmp_path,
                                                                control_image):
    """A folder whose controlled UNet is chunked only: --controlnet runs the chunks and gives the whole's image."""
    folder = tmp_path / "chunked"
    folder.mkdir()
    for package in [*chunked_controlled[1], *models_dir.iterdir()]:
        if not package.name.endswith(("_control-unet.mlpackage", "_unet.mlpackage")):
            shutil.copytree(package, folder / package.name)
    chunked = open_pipeline("mil", folder, progress=False, controlnet=NAME)
    assert "unet" not in chunked.models.components and "unet_chunk2" in chunked.models.components
    whole, cut = (p.generate(request_with(control_image)) for p in (pipes["mil"], chunked))
    # fp16 rounding apart (the chunk boundary hands NCHW arrays to layers that get channels-last tensors in the
    # whole): decoded images and latents >= 60 dB (65.1 and 63.6 measured); the PNGs then differ by one level at most.
    assert psnr(whole.intermediates["decoded_image"], cut.intermediates["decoded_image"]) >= 60
    assert psnr(whole.intermediates["final_latents"], cut.intermediates["final_latents"]) >= 60
    assert np.abs(np.asarray(whole.image, np.int16) - np.asarray(cut.image, np.int16)).max() <= 1


def test_bundle_holds_controlnets_in_apples_layout(tmp_path):
    """--bundle-packages with a ControlNet: Resources/ControlledUnet.mlpackage and controlnet/<name>.mlpackage, where the
    Swift ResourceFolder (and Apple's pipeline) look for them."""
    argv = ["--model-version", "tiny", "--convert-unet", "--unet-support-controlnet", "--convert-controlnet", NAME,
            "--convert-text-encoder", "--convert-vae-decoder", "--bundle-packages", "-o", str(tmp_path)]
    assert torch2coreml.main(argv) == 0
    resources = tmp_path / "Resources"
    assert {p.name for p in resources.glob("*.mlpackage")} == {"ControlledUnet.mlpackage", "TextEncoder.mlpackage",
                                                               "VAEDecoder.mlpackage"}
    assert [p.name for p in (resources / "controlnet").iterdir()] == [f"{NAME}.mlpackage"]


def test_sdxl_bundle_holds_controlnets_in_apples_layout(tmp_path):
    """SDXL too (the Swift SDXL pipeline takes ControlNets): ControlledUnet, both text encoders and
    controlnet/tiny-xl-controlnet.mlpackage."""
    argv = ["--model-version", "tiny-xl", "--convert-unet", "--unet-support-controlnet", "--convert-controlnet",
            "tiny-xl-controlnet", "--convert-text-encoder", "--convert-vae-decoder", "--bundle-packages", "-o",
            str(tmp_path)]
    assert torch2coreml.main(argv) == 0
    resources = tmp_path / "Resources"
    assert {p.name for p in resources.glob("*.mlpackage")} == {
        "ControlledUnet.mlpackage", "TextEncoder.mlpackage", "TextEncoder2.mlpackage", "VAEDecoder.mlpackage"}
    assert [p.name for p in (resources / "controlnet").iterdir()] == ["tiny-xl-controlnet.mlpackage"]
