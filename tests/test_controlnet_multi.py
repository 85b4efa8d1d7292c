"""Several ControlNets at once (issue 19): `--controlnet A B --control-image a b [--controlnet-scale 1 0.5]`, each
ControlNet's residuals scaled and summed as diffusers' MultiControlNetModel. The torch loop against diffusers'
StableDiffusionControlNetPipeline given the list of ControlNets (same draws), the mil backend against torch, and
counts of images or scales that do not match the ControlNets refused in one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.setup import open_pipeline
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from tests.support import assert_one_line, run_pipeline_cli

NAMES = ("tiny-controlnet", "tiny-controlnet-2")
SCALES = (1.0, 0.5)
STEPS = 3


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """fp16: text encoder, VAE decoder, the controlled UNet and both ControlNets."""
    out = tmp_path_factory.mktemp("multi_controlnet")
    convert(ConversionOptions(model_version="tiny", output_dir=out, controlnets=NAMES, unet_support_controlnet=True),
            ["text_encoder", "vae_decoder", "unet", "controlnet"])
    return out


@pytest.fixture(scope="module")
def images():
    yy, xx = np.mgrid[0:128, 0:128]
    checker = ((xx // 16 + yy // 16) % 2 * 255).astype(np.uint8)
    stripes = ((xx + 2 * yy) // 12 % 2 * 255).astype(np.uint8)
    return tuple(Image.fromarray(np.stack([a] * 3, axis=-1)) for a in (checker, stripes))


def request_with(images, scales=SCALES, **kwargs):
    return GenerationRequest(prompt="a house by a lake", seed=7, num_inference_steps=STEPS, control_image=images,
                             controlnet_scale=scales, **kwargs)


@pytest.fixture(scope="module")
def torch_pipe():
    return open_pipeline("torch", progress=False, controlnet=NAMES)


def diffusers_multi_controlnet(request) -> np.ndarray:
    """Final latents of diffusers' StableDiffusionControlNetPipeline with both ControlNets (its
    MultiControlNetModel) and our initial latents (RandomSource's first draw); everything else its own."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from python_coreml_sd.controlnets import resolve_controlnet
    controlnets = [ControlNetModel.from_pretrained(str(resolve_controlnet(n).root)) for n in NAMES]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(resolve("tiny").root), controlnet=controlnets,
                                                             use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    start = torch.from_numpy(np.random.RandomState(request.seed).randn(1, 4, 16, 16).astype(np.float32))
    with torch.no_grad():
        return pipe(request.prompt, image=list(request.control_image), latents=start, height=128, width=128,
                    num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                    controlnet_conditioning_scale=list(request.controlnet_scale), output_type="latent").images.numpy()


def test_torch_loop_is_diffusers_multi_controlnet_pipeline(torch_pipe, images):
    request = request_with(images)
    ours = torch_pipe.generate(request).intermediates["final_latents"]
    assert psnr(diffusers_multi_controlnet(request), ours) >= 60
    # each ControlNet and its scale count: the first alone (the second's scale 0) is another result
    alone = torch_pipe.generate(request_with(images, (1.0, 0.0))).intermediates["final_latents"]
    swapped = torch_pipe.generate(request_with(images[::-1])).intermediates["final_latents"]
    # fp32 torch repeats a computation to > 100 dB: under 60 is a change the second ControlNet made
    assert psnr(ours, alone) < 60 and psnr(ours, swapped) < 60, (psnr(ours, alone), psnr(ours, swapped))


def test_one_scale_is_every_controlnets(torch_pipe, images):
    one, both = (torch_pipe.generate(request_with(images, s)).intermediates["final_latents"] for s in (0.5, (0.5, 0.5)))
    assert np.array_equal(one, both)


def test_mil_matches_torch_with_two_controlnets(models_dir, images):
    results = [open_pipeline(backend, models_dir, progress=False, controlnet=NAMES).generate(request_with(images))
               for backend in ("mil", "torch")]
    assert psnr(results[1].intermediates["final_latents"], results[0].intermediates["final_latents"]) >= 30
    assert psnr(np.asarray(results[1].image, np.float32), np.asarray(results[0].image, np.float32)) >= 30


def test_cli_writes_the_controlnets_and_scales_in_the_png(capsys, tmp_path, images):
    from python_coreml_sd import pipeline as pipeline_cli
    for name, image in zip("ab", images):
        image.save(tmp_path / f"{name}.png")
    assert pipeline_cli.main(["--prompt", "a house", "--backend", "torch", "--controlnet", *NAMES, "--control-image",
                              str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--controlnet-scale", "1", "0.5",
                              "--num-inference-steps", "1", "-o", str(tmp_path / "out")]) == 0
    (png,) = (tmp_path / "out").iterdir()
    text = Image.open(png).text
    assert text["controlnet"] == str(list(NAMES)) and text["controlnet_scale"] == "[1.0, 0.5]"


@pytest.mark.parametrize("flags, fragments", [
    (["--controlnet", *NAMES, "--control-image", "a.png"], ["--control-image: 1 image for 2 ControlNets",
                                                            "one condition image per ControlNet"]),
    (["--controlnet", NAMES[0], "--control-image", "a.png", "b.png"], ["2 images for 1 ControlNet"]),
    (["--controlnet", *NAMES, "--control-image", "a.png", "b.png", "--controlnet-scale", "1", "2", "3"],
     ["--controlnet-scale: 3 scales for 2 ControlNets", "one scale for all or one per ControlNet"]),
    (["--controlnet", *NAMES], ["--controlnet needs --control-image"]),
    (["--control-image", "a.png"], ["--control-image needs --controlnet"]),
    (["--controlnet", *NAMES, "--control-image", "a.png", "b.png", "--controlnet-scale", "1", "nan"],
     ["--controlnet-scale takes finite numbers"]),
])
def test_counts_not_matching_the_controlnets_are_refused_in_one_line(capsys, tmp_path, images, flags, fragments):
    for name, image in zip("ab", images):
        image.save(tmp_path / f"{name}.png")
    code, err = run_pipeline_cli(capsys, "--prompt", "a house", "--backend", "torch",
                                 *[str(tmp_path / f) if f.endswith(".png") else f for f in flags],
                                 "--num-inference-steps", "1", "-o", str(tmp_path / "out"))
    assert_one_line(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def parity_cli(capsys, models_dir, out, images_dir, *extra):
    from python_coreml_sd import parity
    argv = ["--prompt", "a house", "-i", str(models_dir), "-o", str(out), "--controlnet", *NAMES, "--control-image",
            str(images_dir / "a.png"), str(images_dir / "b.png"), "--controlnet-scale", "1", "0.5",
            "--num-inference-steps", "2", *extra]
    try:
        code = parity.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr()


def test_parity_compares_each_controlnets_residuals(capsys, tmp_path, models_dir, images):
    """The converted ControlNets' first-step residuals against the PyTorch ControlNets', a stage each; a package of
    the wrong ControlNet under a ControlNet's name fails its stage."""
    import json
    import shutil
    for name, image in zip("ab", images):
        image.save(tmp_path / f"{name}.png")
    code, printed = parity_cli(capsys, models_dir, tmp_path / "report", tmp_path)
    values = json.loads((tmp_path / "report" / "report.json").read_text())["results"][0]["psnr_db"]
    stages = ["first_residuals_controlnet_0", "first_residuals_controlnet_1"]
    assert code == 0 and [k for k in values if k.startswith("first_residuals")] == stages, values
    assert all(35 <= values[s] < 150 for s in stages), values  # fp16 packages against fp32: close, not identical
    assert all(stage in printed.out for stage in stages)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for package in models_dir.iterdir():
        target = {f"ControlNet_{a}.mlpackage": f"ControlNet_{b}.mlpackage" for a, b in (NAMES, NAMES[::-1])}
        shutil.copytree(package, swapped / target.get(package.name, package.name))
    code, printed = parity_cli(capsys, swapped, tmp_path / "swapped_report", tmp_path)
    values = json.loads((tmp_path / "swapped_report" / "report.json").read_text())["results"][0]["psnr_db"]
    assert code == 1 and all(values[s] < 30 for s in stages), values
