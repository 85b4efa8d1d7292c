"""SDXL ControlNets (issue 19; Apple's toolkit has none): the tiny-xl ControlNet test model (its added conditions:
time_ids, text_embeds) converted with the controlled SDXL UNet (every attention implementation, chunked too), both
run on the MIL runtime against diffusers' ControlNetModel / UNet2DConditionModel; generation on the mil and torch
backends against diffusers' StableDiffusionXLControlNetPipeline with the same draws; ControlNets of the other
family refused in one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from python_coreml_sd import pipeline as pipeline_cli, torch2coreml
from python_coreml_sd.components import RESIDUAL, SDXL, TABLE, controlled_dims, residual_shapes, text_pooled_width
from python_coreml_sd.controlnets import resolve_controlnet
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.setup import open_pipeline
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.runtime import load_model
from tests.support import assert_one_line, converted, run_pipeline_cli

MODEL, NAME = "tiny-xl", "tiny-xl-controlnet"
ATTENTIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
CONTROLLED = f"Stable_Diffusion_version_{MODEL}_control-unet.mlpackage"
# fp32 MIL runtime vs diffusers fp32, measured: ControlNet residuals 134.9..155.9 dB, controlled UNet 134.5 dB
# (ORIGINAL) / 134.7 dB (SPLIT_EINSUM, SPLIT_EINSUM_V2)
PACKAGE_PSNR = 130
MIL_PIPELINE_PSNR = 125  # final latents, fp32 packages on the mil backend: measured 132.2 dB


@pytest.fixture(scope="module")
def edges():
    yy, xx = np.mgrid[0:128, 0:128]
    return Image.fromarray(np.stack([((xx // 16 + yy // 16) % 2 * 255).astype(np.uint8)] * 3, axis=-1))


@pytest.fixture(scope="module")
def source():
    return resolve(MODEL)


def convert_to(out, components, **options):
    return converted(MODEL, out, components, **options)


@pytest.fixture(scope="module")
def fp32_packages(tmp_path_factory):
    """The ControlNet and the controlled UNet of each attention implementation, fp32."""
    packages = {}
    for attention in ATTENTIONS:
        found = convert_to(tmp_path_factory.mktemp(f"xl_controlnet_{attention}"),
                           ["unet"] + (["controlnet"] if not packages else []), compute_precision="float32",
                           attention_implementation=attention, controlnets=() if packages else (NAME,),
                           unet_support_controlnet=True)
        packages[attention] = found[CONTROLLED]
        packages.setdefault("controlnet", found.get(f"ControlNet_{NAME}.mlpackage"))
    return packages


def run(package, inputs: dict) -> dict:
    return load_model(package, backend="mil").predict({k: np.asarray(v, np.float32) for k, v in inputs.items()})


def unet_inputs(source, with_residuals=False):
    from python_coreml_sd.convert.unet import residual_inputs, sample_inputs
    config = source.config("unet")
    inputs = sample_inputs(config, 2, 16, 16, 77, text_pooled_width(source))
    return {**inputs, **(residual_inputs(config, inputs) if with_residuals else {})}


def test_tiny_xl_controlnet_takes_sdxls_added_conditions(source):
    controlnet = resolve_controlnet(NAME)
    config = controlnet.config()
    assert config["addition_embed_type"] == "text_time"
    controlnet.check_fits(source.config("unet"), MODEL)
    dims = controlled_dims(source.config("unet"), 2, 16, 16, 77, text_pooled_width(source))
    assert dims.residuals == residual_shapes(source.config("unet"), 16, 16) and (dims.time_ids, dims.text_pooled) == (6, 32)
    assert TABLE["controlnet"].io(SDXL).input_names(dims) == (
        "sample", "timestep", "encoder_hidden_states", "time_ids", "text_embeds", "controlnet_cond")


def test_controlnet_package_matches_diffusers_fp32(fp32_packages, source):
    from python_coreml_sd.convert.controlnet import example_inputs
    inputs = example_inputs(source.config("unet"), 2, 16, 16, 77, text_pooled_width(source))
    states = inputs["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)
    with torch.no_grad():
        down, mid = resolve_controlnet(NAME).load()(
            inputs["sample"], inputs["timestep"], encoder_hidden_states=states, controlnet_cond=inputs["controlnet_cond"],
            added_cond_kwargs={k: inputs[k] for k in ("time_ids", "text_embeds")}, return_dict=False)
    out = run(fp32_packages["controlnet"], inputs)
    shapes = residual_shapes(source.config("unet"), 16, 16)
    assert tuple(out) == tuple(RESIDUAL.format(i) for i in range(len(shapes)))
    for name, expected, shape in zip(out, (*down, mid), shapes):
        assert out[name].shape == (2, *shape) == tuple(expected.shape)
        assert expected.abs().mean() > 1e-3 and psnr(expected.numpy(), out[name]) >= PACKAGE_PSNR, name


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_controlled_unet_matches_diffusers_with_residuals_fp32(fp32_packages, attention, source):
    inputs = unet_inputs(source, with_residuals=True)
    residuals = [v for k, v in inputs.items() if k.startswith(RESIDUAL.format(""))]
    unet = source.load_unet()
    kwargs = {"encoder_hidden_states": inputs["encoder_hidden_states"][:, :, 0, :].transpose(1, 2),
              "added_cond_kwargs": {k: inputs[k] for k in ("time_ids", "text_embeds")}}
    with torch.no_grad():
        reference = unet(inputs["sample"], inputs["timestep"], down_block_additional_residuals=residuals[:-1],
                         mid_block_additional_residual=residuals[-1], **kwargs).sample.numpy()
        plain = unet(inputs["sample"], inputs["timestep"], **kwargs).sample.numpy()
    assert psnr(reference, run(fp32_packages[attention], inputs)["noise_pred"]) >= PACKAGE_PSNR
    assert psnr(reference, plain) < 30  # the residuals reach the output


def test_chunked_controlled_unet_equals_the_whole(fp32_packages, tmp_path, source):
    whole, *chunks = convert(ConversionOptions(MODEL, tmp_path, compute_precision="float32", chunk_unet=True,
                                               unet_support_controlnet=True), ["unet"])
    assert [p.name for p in chunks] == [CONTROLLED.replace(".mlpackage", f"_chunk{i}.mlpackage") for i in (1, 2)]
    inputs = {k: v.numpy() for k, v in unet_inputs(source, with_residuals=True).items()}
    first, second = (load_model(c, backend="mil") for c in chunks)
    taken = [{n for n in model.input_description if n.startswith(RESIDUAL.format(""))} for model in (first, second)]
    assert taken[0] | taken[1] == {n for n in inputs if n.startswith(RESIDUAL.format(""))}
    hidden = first.predict({k: v for k, v in inputs.items() if k in first.input_description})
    out = second.predict({k: v for k, v in {**inputs, **hidden}.items() if k in second.input_description})["noise_pred"]
    assert psnr(run(whole, inputs)["noise_pred"], out) >= 60


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """fp32 packages for generation: both text encoders, the VAE decoder, the controlled UNet and the ControlNet."""
    out = tmp_path_factory.mktemp("xl_controlnet_models")
    convert_to(out, ["text_encoder", "vae_decoder", "unet", "controlnet"], controlnets=(NAME,),
               unet_support_controlnet=True, compute_precision="float32")
    return out


@pytest.fixture(scope="module")
def torch_pipe():
    return open_pipeline("torch", model_version=MODEL, progress=False, controlnet=NAME)


def request_with(image, **kwargs):
    return GenerationRequest(prompt="a house", seed=2, num_inference_steps=3, scheduler="EulerDiscrete",
                             guidance_scale=5.0, control_image=image, **kwargs)


def diffusers_xl_controlnet(request) -> np.ndarray:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    controlnet = ControlNetModel.from_pretrained(str(resolve_controlnet(NAME).root))
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(str(resolve(MODEL).root), controlnet=controlnet,
                                                               use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    start = torch.from_numpy(np.random.RandomState(request.seed).randn(1, 4, 16, 16).astype(np.float32))
    with torch.no_grad():
        return pipe(request.prompt, image=request.control_image[0], latents=start, height=128, width=128,
                    num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                    controlnet_conditioning_scale=request.controlnet_scale[0], output_type="latent").images.numpy()


def test_torch_loop_is_diffusers_xl_controlnet_pipeline(torch_pipe, edges):
    request = request_with(edges, controlnet_scale=0.8)
    ours = torch_pipe.generate(request).intermediates
    assert ours["first_residuals_controlnet_0"].size > 0
    assert psnr(diffusers_xl_controlnet(request), ours["final_latents"]) >= 60
    other = torch_pipe.generate(request_with(edges.rotate(90), controlnet_scale=0.8)).intermediates["final_latents"]
    assert psnr(ours["final_latents"], other) < 60  # fp32 torch repeats a computation to > 100 dB


def test_mil_pipeline_is_diffusers_xl_controlnet_pipeline(models_dir, tmp_path, edges):
    """The converted SDXL ControlNet and controlled UNet steer generation on the mil backend as diffusers' do."""
    request = request_with(edges, controlnet_scale=0.8)
    ours = open_pipeline("mil", models_dir, MODEL, progress=False, controlnet=NAME).generate(request).intermediates
    assert psnr(diffusers_xl_controlnet(request), ours["final_latents"]) >= MIL_PIPELINE_PSNR
    edges.save(tmp_path / "edges.png")
    pipeline_cli.main(["--prompt", "a house", "-i", str(models_dir), "--model-version", MODEL, "--backend", "mil",
                       "--controlnet", NAME, "--control-image", str(tmp_path / "edges.png"), "--num-inference-steps",
                       "2", "-o", str(tmp_path / "out")])
    (image,) = (tmp_path / "out").glob("*.png")
    assert Image.open(image).size == (128, 128)


@pytest.mark.parametrize("model, controlnet", [(MODEL, "tiny-controlnet"), ("tiny", NAME)])
def test_a_controlnet_of_the_other_family_is_refused(capsys, tmp_path, edges, model, controlnet):
    edges.save(tmp_path / "edges.png")
    code, err = run_pipeline_cli(capsys, "--prompt", "a house", "--model-version", model, "--backend", "torch",
                                 "--controlnet", controlnet, "--control-image", str(tmp_path / "edges.png"),
                                 "--num-inference-steps", "1", "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "another model family", "SDXL's")
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--model-version", model, "--convert-controlnet", controlnet, "-o", str(tmp_path / "out")])
    assert_one_line(exit_info.value.code, capsys.readouterr().err.strip(), "another model family", "SDXL's",
                    prog="torch2coreml")
    assert not (tmp_path / "out").exists()


def test_parity_compares_the_sdxl_controlnets_residuals(capsys, tmp_path, models_dir, edges):
    """parity on SDXL with a ControlNet: both encoders, pooled embeddings, the ControlNet's first-step residuals
    and the controlled UNet's first step, each a stage; fp32 packages on the MIL runtime against PyTorch fp32."""
    import json
    from python_coreml_sd import parity
    edges.save(tmp_path / "edges.png")
    code = parity.main(["--prompt", "a house", "-i", str(models_dir), "--model-version", MODEL, "-o",
                        str(tmp_path / "report"), "--controlnet", NAME, "--control-image", str(tmp_path / "edges.png"),
                        "--num-inference-steps", "2", "--psnr-threshold", "60"])
    values = json.loads((tmp_path / "report" / "report.json").read_text())["results"][0]["psnr_db"]
    stages = ["text_encoder_hidden", "text_encoder_2_hidden", "pooled_embeddings", "first_residuals_controlnet_0",
              "first_noise_pred", "final_latents"]
    assert code == 0 and all(stage in values for stage in stages), values
    assert all(values[s] >= 60 for s in stages), values
    assert "first_residuals_controlnet_0" in capsys.readouterr().out
