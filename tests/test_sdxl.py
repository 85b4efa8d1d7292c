"""SDXL (issue 16) on `tiny-xl` and `tiny-xl-refiner`: the converted components against diffusers in fp32, their
interface against the component table and Apple's names, the Neural-Engine UNet's added conditions, the
pipeline on mil vs torch and the torch loop vs diffusers' own StableDiffusionXLPipeline, and bad input."""
import dataclasses
import json
import shutil
import zipfile

import coremltools as ct
import numpy as np
import pytest
import torch

from python_coreml_sd import torch2coreml
from python_coreml_sd.components import SDXL, TABLE, Dims, component_of
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.generation.parity import compare
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.generation.setup import open_pipeline
from python_coreml_sd.layers.attention import ATTENTION_IMPLEMENTATIONS
from python_coreml_sd.layers.unet import from_diffusers
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.runtime import load_model

STEPS = 4
# Apple's ml-stable-diffusion names for SDXL (torch2coreml.py with --xl-version, its Swift pipeline's Resources).
APPLE_XL = {
    "text_encoder": (("input_ids",), ("hidden_embeds", "pooled_outputs"), "TextEncoder"),
    "text_encoder_2": (("input_ids",), ("hidden_embeds", "pooled_outputs"), "TextEncoder2"),
    "unet": (("sample", "timestep", "encoder_hidden_states", "time_ids", "text_embeds"), ("noise_pred",), "Unet"),
    "refiner": (("sample", "timestep", "encoder_hidden_states", "time_ids", "text_embeds"), ("noise_pred",),
                "UnetRefiner"),
    "vae_decoder": (("z",), ("image",), "VAEDecoder"),
}


@pytest.fixture(scope="module")
def xl():
    return resolve("tiny-xl")


@pytest.fixture(scope="module")
def refiner():
    return resolve("tiny-xl-refiner")


@pytest.fixture(scope="module")
def xl_packages(tmp_path_factory, xl):
    """tiny-xl's components and tiny-xl-refiner's UNet, fp16, as `--convert-text-encoder --convert-unet
    --convert-vae-decoder --convert-vae-encoder --refiner-version tiny-xl-refiner` writes them."""
    out = tmp_path_factory.mktemp("tiny_xl")
    options = ConversionOptions(model_version="tiny-xl", output_dir=out, refiner_version="tiny-xl-refiner")
    paths = convert(options, ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
    return {component_of(p): p for p in paths}


def declared(package) -> tuple:
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    return ({f.name: tuple(f.type.multiArrayType.shape) for f in spec.description.input},
            tuple(f.name for f in spec.description.output))


def xl_dims(source, unet_config, batch=2) -> Dims:
    from python_coreml_sd.components import text_pooled_width, xl_dims as dims
    size = unet_config["sample_size"]
    return dims(unet_config, batch, size, size, 77, text_pooled_width(source))


def test_packages_have_the_tables_and_apples_interface(xl_packages, xl, refiner):
    assert set(xl_packages) == {"text_encoder", "text_encoder_2", "unet", "refiner", "vae_decoder", "vae_encoder"}
    dims = {"unet": xl_dims(xl, xl.config("unet")), "refiner": xl_dims(refiner, refiner.config("unet"))}
    assert (dims["unet"].time_ids, dims["refiner"].time_ids, dims["unet"].text_pooled) == (6, 5, 32)
    assert dims["unet"].text_hidden == 96  # both encoders' widths, 32 + 64
    for name, package in xl_packages.items():
        shapes, outputs = declared(package)
        interface = TABLE[name].io(SDXL)
        assert (tuple(shapes), outputs) == (interface.inputs, interface.outputs), name
        if name in APPLE_XL:
            assert (tuple(shapes), outputs, TABLE[name].resource) == APPLE_XL[name], name
        if name in dims:
            assert shapes == interface.input_shapes(dims[name]), name
    assert xl_packages["refiner"].name == "Stable_Diffusion_version_tiny-xl_refiner.mlpackage"  # Apple's file name
    assert declared(xl_packages["unet"])[0]["time_ids"] == (2, 6)
    assert declared(xl_packages["refiner"])[0]["encoder_hidden_states"] == (2, 64, 1, 77)  # text_encoder_2 alone


def run(package, inputs: dict) -> dict:
    return load_model(package, backend="mil").predict({k: np.asarray(v, np.float32) for k, v in inputs.items()})


def token_ids(seed=0, vocab=49408, length=77):
    ids = np.random.RandomState(seed).randint(0, vocab - 2, (1, length))
    ids[0, 0], ids[0, 20:] = 49406, 49407
    return ids


def test_text_encoders_match_diffusers_fp32(xl_packages, xl):
    """Penultimate hidden states of both encoders, pooler output of the first, projected text_embeds of the
    second: as diffusers' StableDiffusionXLPipeline.encode_prompt reads them."""
    ids = token_ids()
    with torch.no_grad():
        first = xl.load_text_encoder()(torch.from_numpy(ids), output_hidden_states=True)
        second = xl.load_text_encoder_2()(torch.from_numpy(ids), output_hidden_states=True)
    for name, reference in (("text_encoder", first), ("text_encoder_2", second)):
        out = run(xl_packages[name], {"input_ids": ids})
        assert psnr(reference.hidden_states[-2].numpy(), out["hidden_embeds"]) >= 60, name
        pooled = reference.text_embeds if name == "text_encoder_2" else reference.pooler_output
        assert psnr(pooled.numpy(), out["pooled_outputs"]) >= 55, name
    # the penultimate states are not the last ones: SDXL's interface really differs from SD's
    assert psnr(first.last_hidden_state.numpy(), run(xl_packages["text_encoder"], {"input_ids": ids})["hidden_embeds"]) < 30


def unet_inputs(source, config, seed=0):
    from python_coreml_sd.convert.unet import sample_inputs, text_pooled_width
    size = config["sample_size"]
    inputs = sample_inputs(config, 2, size, size, 77, text_pooled_width(source))
    generator = torch.Generator().manual_seed(seed)
    inputs["text_embeds"] = torch.randn(inputs["text_embeds"].shape, generator=generator)
    return inputs


@pytest.mark.parametrize("component", ["unet", "refiner"])
def test_unets_match_diffusers_fp32(xl_packages, xl, refiner, component):
    from python_coreml_sd.convert.unet import diffusers_reference
    source = xl if component == "unet" else refiner
    unet = source.load_unet()
    inputs = unet_inputs(source, dict(unet.config), seed=3)
    reference = diffusers_reference(unet, inputs)
    out = run(xl_packages[component], {k: v.numpy() for k, v in inputs.items()})["noise_pred"]
    assert psnr(reference, out) >= 45
    # the added conditions reach the output: other time ids or pooled embeddings, another prediction
    # (random weights: a small change, but far beyond the conversion's error)
    other = dict(inputs, time_ids=inputs["time_ids"] * 0.5)
    moved = psnr(reference, diffusers_reference(unet, other))
    converted = psnr(diffusers_reference(unet, other),
                     run(xl_packages[component], {k: v.numpy() for k, v in other.items()})["noise_pred"])
    assert converted >= 45 and converted >= moved + 10, (converted, moved)


@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
def test_neural_engine_unet_takes_the_added_conditions(xl, refiner, attention):
    for source in (xl, refiner):
        unet = source.load_unet()
        inputs = unet_inputs(source, dict(unet.config))
        from python_coreml_sd.convert.unet import diffusers_reference
        with torch.no_grad():
            ours = from_diffusers(unet, attention)(*inputs.values()).numpy()
        assert psnr(diffusers_reference(unet, inputs), ours) >= 100, (source.name, attention)


@pytest.mark.parametrize("attention", ["ORIGINAL", "SPLIT_EINSUM_V2"])
def test_other_attention_implementations_convert_and_check(tmp_path, attention):
    """--check-output-correctness on the MIL runtime (it raises CheckFailed under the threshold), batch one."""
    options = ConversionOptions(model_version="tiny-xl", output_dir=tmp_path, attention_implementation=attention,
                                unet_batch_one=True, check_output_correctness=True, psnr_threshold=45)
    (path,) = convert(options, ["unet"])
    assert declared(path)[0]["time_ids"] == (1, 6) and declared(path)[0]["text_embeds"] == (1, 32)


@pytest.fixture(scope="module")
def pipes(xl_packages):
    folder = xl_packages["unet"].parent  # holds the refiner's package too; the torch backend gets its model
    return {backend: open_pipeline(backend, folder, "tiny-xl", progress=False,
                                   refiner_version="tiny-xl-refiner" if backend == "torch" else None)
            for backend in ("mil", "torch")}


def start_image(size=128):
    """A smooth colour gradient, the img2img start picture (as tests/test_pipeline.py's)."""
    from PIL import Image
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), 255 - np.add.outer(ramp, 0 * ramp)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("negative, refiner_start, strength", [
    ("", None, None), ("blurry, low quality", None, None), ("", 0.5, None), ("", None, 0.6), ("", 0.5, 0.8)])
def test_mil_matches_torch(pipes, negative, refiner_start, strength):
    request = GenerationRequest("a lighthouse at dusk, oil painting", negative_prompt=negative, seed=7,
                                num_inference_steps=STEPS, scheduler="EulerDiscrete", refiner_start=refiner_start,
                                image=start_image() if strength else None, strength=strength)
    reference, converted = pipes["torch"].generate(request), pipes["mil"].generate(request)
    values = compare(reference, converted)
    assert {"text_encoder_hidden", "text_encoder_2_hidden", "pooled_embeddings", "first_noise_pred", "final_latents",
            "decoded_image", "final_image"} <= set(values)
    assert all(v >= 30 for v in values.values()), values
    assert converted.image.size == (128, 128)


def diffusers_latents(source, request, latents):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(source.root), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: getattr(request, k) for k in ("original_size", "target_size") if getattr(request, k)}
    return pipe(request.prompt, negative_prompt=request.negative_prompt or None, latents=torch.from_numpy(latents),
                num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                crops_coords_top_left=request.crops_coords_top_left, output_type="latent", height=128, width=128,
                **kwargs).images.numpy()


@pytest.mark.parametrize("change", [
    dict(),  # no negative prompt: force_zeros_for_empty_prompt zeroes the unconditional embeddings
    dict(negative_prompt="blurry"),
    dict(original_size=(64, 96), crops_coords_top_left=(8, 16), target_size=(256, 256)),
])
def test_torch_loop_is_diffusers_sdxl_pipeline(pipes, xl, change):
    """Our loop on diffusers' modules vs diffusers' StableDiffusionXLPipeline itself, same initial latents and
    scheduler: micro-conditioning, pooled embeddings and empty-prompt zeros as diffusers computes them."""
    request = GenerationRequest("a red fox in the snow", seed=5, num_inference_steps=STEPS, scheduler="EulerDiscrete",
                                guidance_scale=5.0, **change)
    ours = pipes["torch"].generate(request).intermediates["final_latents"]
    start = np.random.RandomState(request.seed).randn(1, 4, 16, 16).astype(np.float32)  # RandomSource's draw
    assert psnr(diffusers_latents(xl, request, start), ours) >= 60


@pytest.mark.parametrize("scheduler, fraction", [("EulerDiscrete", 0.5), ("EulerDiscrete", 0.8), ("DPMSolverMultistep", 0.3)])
def test_refiner_hand_off_is_diffusers(pipes, xl, refiner, scheduler, fraction):
    """--refiner-start as diffusers' base denoising_end and refiner denoising_start (the refiner with the base's
    text_encoder_2, as diffusers documents it and Apple's pipeline runs it)."""
    import diffusers
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    request = GenerationRequest("a lighthouse at dusk", seed=9, num_inference_steps=5, scheduler=scheduler,
                                refiner_start=fraction)
    ours = pipes["torch"].generate(request)
    assert "first_noise_pred_refiner" in ours.intermediates
    base = StableDiffusionXLPipeline.from_pretrained(str(xl.root), use_safetensors=True)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner.root), text_encoder_2=base.text_encoder_2,
                                                               tokenizer_2=base.tokenizer_2, vae=base.vae)
    for pipe in (base, second):
        pipe.scheduler = getattr(diffusers, f"{scheduler}Scheduler").from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    start = torch.from_numpy(np.random.RandomState(request.seed).randn(1, 4, 16, 16).astype(np.float32))
    common = dict(num_inference_steps=5, guidance_scale=request.guidance_scale, output_type="latent")
    handed = base(request.prompt, latents=start, denoising_end=fraction, height=128, width=128, **common).images
    final = second(request.prompt, image=handed, denoising_start=fraction, **common).images
    assert psnr(final.numpy(), ours.intermediates["final_latents"]) >= 60
    alone = pipes["torch"].generate(GenerationRequest(request.prompt, seed=9, num_inference_steps=5, scheduler=scheduler))
    assert not np.allclose(alone.intermediates["final_latents"], ours.intermediates["final_latents"], atol=1e-3)  # refined


@pytest.fixture
def shared_draws(monkeypatch):
    """diffusers' randn_tensor, where its SDXL img2img draws (the VAE posterior's sample, then the noise), takes
    RandomSource's stream instead: the draws our img2img makes in that order, so both start alike."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module

    def use(seed):
        state = np.random.RandomState(seed)

        def draw(shape, generator=None, device=None, dtype=None, layout=None):
            return torch.from_numpy(state.randn(*shape).astype(np.float32)).to(dtype or torch.float32)
        for module in (vae_module, img2img_module):
            monkeypatch.setattr(module, "randn_tensor", draw)
    return use


@pytest.mark.parametrize("scheduler, strength, change", [
    ("EulerDiscrete", 0.3, dict()),  # diffusers' default strength for SDXL img2img
    ("EulerDiscrete", 0.75, dict(negative_prompt="blurry")),
    ("DPMSolverMultistep", 0.6, dict(original_size=(64, 96), crops_coords_top_left=(8, 16), target_size=(256, 256))),
    ("EulerAncestralDiscrete", 1.0, dict()),
])
def test_torch_img2img_is_diffusers_sdxl_img2img(pipes, xl, shared_draws, scheduler, strength, change):
    """--image / --strength on SDXL vs diffusers' StableDiffusionXLImg2ImgPipeline on the same draws: the encoded,
    sampled and noised start, the timesteps strength keeps, the micro-conditioning time ids (6: the base UNet takes
    no aesthetic score, as diffusers' requires_aesthetics_score=False)."""
    import diffusers
    from diffusers import StableDiffusionXLImg2ImgPipeline
    request = GenerationRequest("a red fox in the snow", seed=5, num_inference_steps=5, scheduler=scheduler,
                                guidance_scale=5.0, image=start_image(), strength=strength, **change)
    ours = pipes["torch"].generate(request).intermediates["final_latents"]
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(xl.root), use_safetensors=True)
    assert not pipe.config.requires_aesthetics_score
    pipe.scheduler = getattr(diffusers, f"{scheduler}Scheduler").from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    shared_draws(request.seed)
    kwargs = {k: getattr(request, k) for k in ("original_size", "target_size") if getattr(request, k)}
    theirs = pipe(request.prompt, image=request.image, strength=strength, negative_prompt=request.negative_prompt or None,
                  num_inference_steps=5, guidance_scale=5.0, crops_coords_top_left=request.crops_coords_top_left,
                  output_type="latent", generator=torch.Generator().manual_seed(request.seed), **kwargs).images
    assert psnr(theirs.numpy(), ours) >= 60


def test_sdxl_img2img_follows_the_image_and_strength(pipes):
    def latents(image, strength):
        request = GenerationRequest("a red fox", seed=3, num_inference_steps=4, scheduler="EulerDiscrete",
                                    image=image, strength=strength)
        return pipes["torch"].generate(request).intermediates["final_latents"]
    low = latents(start_image(), 0.5)
    assert not np.allclose(low, latents(start_image().rotate(90), 0.5), atol=1e-3)
    assert not np.allclose(low, latents(start_image(), 1.0), atol=1e-3)


def test_micro_conditioning_and_empty_prompt_change_the_result(pipes):
    def latents(**change):
        request = GenerationRequest("a red fox", seed=3, num_inference_steps=2, scheduler="EulerDiscrete", **change)
        return pipes["torch"].generate(request).intermediates["final_latents"]
    plain = latents()
    assert not np.allclose(plain, latents(original_size=(512, 512)))
    assert not np.allclose(plain, latents(crops_coords_top_left=(32, 0)))
    assert not np.allclose(plain, latents(negative_prompt=" "))  # encoded, not zeros


def test_sdxl_time_ids(pipes):
    request = GenerationRequest("x", original_size=(1, 2), crops_coords_top_left=(3, 4), target_size=(5, 6))
    assert pipes["mil"].time_ids(request).tolist() == [[1, 2, 3, 4, 5, 6]] * 2
    assert pipes["mil"].time_ids(GenerationRequest("x")).tolist() == [[128, 128, 0, 0, 128, 128]] * 2


# Bad input: one line, exit 2, nothing written.

def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def copy_model(source, dest):
    shutil.copytree(source.root, dest)
    return dest


def drop_component(folder, name):
    shutil.rmtree(folder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index[name] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("make, argv, fragment", [
    (lambda xl, ref, tiny, d: drop_component(copy_model(xl, d), "text_encoder_2") or d, ["--convert-text-encoder"],
     "is SDXL (StableDiffusionXLPipeline) but has no text_encoder_2"),
    (lambda xl, ref, tiny, d: drop_component(copy_model(xl, d), "text_encoder_2") or d, ["--convert-vae-decoder"],
     "but has no text_encoder_2"),
    (lambda xl, ref, tiny, d: (shutil.rmtree(copy_model(xl, d) / "unet"), shutil.copytree(tiny.root / "unet", d / "unet"),
                               d)[-1], ["--convert-unet"], "its UNet's addition_embed_type is None, not 'text_time'"),
    (lambda xl, ref, tiny, d: ref.root, ["--convert-unet"], "is an SDXL refiner"),
    (lambda xl, ref, tiny, d: ref.root, ["--convert-text-encoder", "--bundle-packages"], "is an SDXL refiner"),
    (lambda xl, ref, tiny, d: tiny.root, ["--convert-unet", "--xl-version"], "--xl-version: model"),
    (lambda xl, ref, tiny, d: xl.root, ["--convert-unet", "--refiner-version", "tiny-xl"], "is not an SDXL refiner"),
    (lambda xl, ref, tiny, d: xl.root, ["--convert-text-encoder", "--refiner-version", "tiny-xl-refiner"],
     "add --convert-unet"),
    (lambda xl, ref, tiny, d: tiny.root, ["--convert-unet", "--refiner-version", "tiny-xl-refiner"],
     "needs an SDXL base"),
])
def test_bad_sdxl_input(capsys, tmp_path, xl, refiner, tiny_source, make, argv, fragment):
    model = make(xl, refiner, tiny_source, tmp_path / "model")
    code, err = run_main(capsys, "--model-version", str(model), "-o", str(tmp_path / "out"), *argv)
    assert code == 2 and err.count("\n") == 0 and err.startswith("torch2coreml: error:"), err
    assert fragment in err, err
    assert not (tmp_path / "out").exists()


def test_pipeline_refuses_an_sdxl_unet_without_text_encoder_2(xl_packages, tmp_path):
    from python_coreml_sd.errors import UserError
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("text_encoder", "unet", "vae_decoder"):
        (folder / xl_packages[name].name).symlink_to(xl_packages[name])
    with pytest.raises(UserError, match="needs text_encoder_2"):
        open_pipeline("mil", folder, "tiny-xl", progress=False)


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.2", "nan"])
def test_refiner_start_outside_the_open_unit_interval(capsys, tmp_path, fraction):
    from tests.support import assert_one_line, run_pipeline_cli
    code, err = run_pipeline_cli(capsys, "--prompt", "x", "--backend", "torch", "--model-version", "tiny-xl",
                                 "--refiner-start", fraction, "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "--refiner-start must be in (0, 1)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["torch", "mil"])
def test_pipeline_refuses_a_refiner_as_the_model(capsys, tmp_path, refiner, backend):
    from tests.support import assert_one_line, run_pipeline_cli
    code, err = run_pipeline_cli(capsys, "--prompt", "x", "--backend", backend, "--model-version", str(refiner.root),
                                 "-o", str(tmp_path / "out"), *(["-i", str(tmp_path)] if backend == "mil" else []))
    assert_one_line(code, err, "is an SDXL refiner", "pass it as --refiner-version")
    assert not (tmp_path / "out").exists()


def test_refiner_start_needs_a_refiner(xl_packages):
    from python_coreml_sd.errors import UserError
    pipe = open_pipeline("torch", xl_packages["unet"].parent, "tiny-xl", progress=False)  # no --refiner-version
    with pytest.raises(UserError, match="needs the refiner's UNet"):
        pipe.generate(GenerationRequest("x", num_inference_steps=2, refiner_start=0.5))


def test_parity_cli_covers_the_sdxl_stages(capsys, tmp_path, xl_packages):
    from python_coreml_sd import parity
    out = tmp_path / "report"
    assert parity.main(["--prompt", "a red fox", "-i", str(xl_packages["unet"].parent), "--model-version", "tiny-xl",
                        "--refiner-version", "tiny-xl-refiner", "--refiner-start", "0.6", "-o", str(out),
                        "--num-inference-steps", "4", "--scheduler", "EulerDiscrete"]) == 0
    (entry,) = json.loads((out / "report.json").read_text())["results"]
    assert set(entry["psnr_db"]) == {"text_encoder_hidden", "text_encoder_2_hidden", "pooled_embeddings",
                                     "text_embeddings", "first_noise_pred", "first_noise_pred_refiner", "final_latents",
                                     "decoded_image", "final_image"}
    assert entry["passed"] and all(35 <= v < 150 for v in entry["psnr_db"].values()), entry


def test_chunked_unet_and_refiner_generate_as_the_whole(tmp_path, xl_packages, pipes):
    """--chunk-unet on SDXL: <model>_unet_chunk1/2 and <model>_refiner_chunk1/2 (Resources UnetChunk1/2,
    UnetRefinerChunk1/2), fed by name by the pipeline, give the whole packages' image."""
    out = tmp_path / "chunked"
    options = ConversionOptions(model_version="tiny-xl", output_dir=out, refiner_version="tiny-xl-refiner",
                                chunk_unet=True)
    paths = {component_of(p): p for p in convert(options, ["unet"])}
    assert set(paths) == {"unet", "unet_chunk1", "unet_chunk2", "refiner", "refiner_chunk1", "refiner_chunk2"}
    assert [TABLE[c].resource for c in ("refiner_chunk1", "refiner_chunk2")] == ["UnetRefinerChunk1", "UnetRefinerChunk2"]
    folder = tmp_path / "models"
    folder.mkdir()
    for name, path in [*((n, xl_packages[n]) for n in ("text_encoder", "text_encoder_2", "vae_decoder")),
                       *((n, p) for n, p in paths.items() if "chunk" in n)]:
        (folder / path.name).symlink_to(path)
    chunked = open_pipeline("mil", folder, "tiny-xl", progress=False)
    assert "unet" not in chunked.models and chunked.models.has_refiner()
    request = GenerationRequest("a red fox", seed=2, num_inference_steps=STEPS, scheduler="EulerDiscrete",
                                refiner_start=0.5)
    whole = pipes["mil"].generate(request)
    assert psnr(whole.intermediates["final_latents"], chunked.generate(request).intermediates["final_latents"]) >= 60


@pytest.fixture(scope="module")
def batch_one(tmp_path_factory, xl_packages):
    """tiny-xl with its UNet converted --unet-batch-one (Apple's flag: batch 1, one call per prediction)."""
    out = tmp_path_factory.mktemp("batch_one")
    [unet] = convert(ConversionOptions(model_version="tiny-xl", output_dir=out / "unet", unet_batch_one=True), ["unet"])
    folder = out / "models"
    folder.mkdir()
    for path in [*(xl_packages[n] for n in ("text_encoder", "text_encoder_2", "vae_decoder")), unet]:
        (folder / path.name).symlink_to(path)
    return open_pipeline("mil", folder, "tiny-xl", progress=False)


def count_unet_calls(pipe, monkeypatch) -> list:
    calls = []
    run = pipe.models.run_unet
    monkeypatch.setattr(pipe.models, "run_unet", lambda inputs, unet: calls.append(inputs["sample"].shape[0]) or
                        run(inputs, unet))
    return calls


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_guidance_at_most_one_is_diffusers_without_guidance(pipes, xl, guidance):
    """SDXL-Turbo's guidance 0 (and any scale <= 1), as diffusers: no classifier-free guidance, the conditional
    prediction alone (guidance 0 is not the unconditional one)."""
    request = GenerationRequest("a red fox in the snow", seed=5, num_inference_steps=STEPS, scheduler="EulerDiscrete",
                                guidance_scale=guidance)
    ours = pipes["torch"].generate(request).intermediates["final_latents"]
    start = np.random.RandomState(request.seed).randn(1, 4, 16, 16).astype(np.float32)
    assert psnr(diffusers_latents(xl, request, start), ours) >= 60
    guided = pipes["torch"].generate(dataclasses.replace(request, guidance_scale=5.0)).intermediates["final_latents"]
    assert not np.allclose(ours, guided, atol=1e-3)


@pytest.mark.parametrize("guidance", [0.0, 5.0])
def test_batch_one_unet_matches_torch_with_and_without_guidance(pipes, batch_one, monkeypatch, guidance):
    """A batch-one UNet: one call per step without guidance, two with; mil (batch one) vs torch."""
    request = GenerationRequest("a lighthouse at dusk", seed=7, num_inference_steps=STEPS, scheduler="EulerAncestralDiscrete",
                                guidance_scale=guidance)
    calls = count_unet_calls(batch_one, monkeypatch)
    converted = batch_one.generate(request)
    assert calls == [1] * STEPS * (2 if guidance > 1 else 1)
    values = compare(pipes["torch"].generate(request), converted)
    assert all(v >= 30 for v in values.values()), values


def test_sdxl_turbo_defaults_to_no_guidance_and_its_own_scheduler(monkeypatch):
    from python_coreml_sd import pipeline, registry
    assert registry.generation_default("stabilityai/sdxl-turbo", "guidance_scale") == 0.0
    assert registry.generation_default("tiny-xl", "guidance_scale") == 7.5
    assert registry.generation_default("/some/folder", "guidance_scale") == 7.5
    assert registry.generation_default("stabilityai/sdxl-turbo", "scheduler") == "EulerAncestralDiscrete"
    assert registry.generation_default("tiny-xl", "scheduler") == "PNDM"
    for argv, expected in ([], (0.0, "EulerAncestralDiscrete")), (["--guidance-scale", "2", "--scheduler", "DDIM"],
                                                                  (2.0, "DDIM")):
        args = pipeline.parser_spec().parse_args(["--prompt", "x", "--model-version", "stabilityai/sdxl-turbo", *argv])
        assert [(r.guidance_scale, r.scheduler) for r in pipeline.requests_from_args(args, [1])] == [expected]
    args = pipeline.parser_spec().parse_args(["--prompt", "x"])
    assert [(r.guidance_scale, r.scheduler) for r in pipeline.requests_from_args(args, [1])] == [(7.5, "PNDM")]
    help_text = " ".join(pipeline.parser_spec().format_help().split())
    assert "0 for stabilityai/sdxl-turbo" in help_text and "EulerAncestralDiscrete for stabilityai/sdxl-turbo" in help_text


@pytest.mark.parametrize("family, billions", [("sdxl", 2.567), ("sdxl-refiner", 2.260), ("sdxl-turbo", 2.567)])
def test_full_size_architectures_fit_the_neural_engine_unet(family, billions):
    """The registry's full-size SDXL UNets (built on the meta device: no weights, no memory) have SDXL's parameter
    counts, and the Neural-Engine UNet holds every tensor of theirs with the same number of values."""
    from diffusers import UNet2DConditionModel
    from python_coreml_sd import registry
    from python_coreml_sd.layers.unet import UNet2DConditionModelANE
    with torch.device("meta"):
        unet = UNet2DConditionModel(**registry.family(family)["architecture"]["unet"])
        ours = UNet2DConditionModelANE(dict(unet.config)).state_dict()
    theirs = unet.state_dict()
    assert round(sum(v.numel() for v in theirs.values()) / 1e9, 3) == billions
    assert set(ours) == set(theirs) and all(ours[k].numel() == v.numel() for k, v in theirs.items())


# ------------------------------------------------------------------------------ bundles (the Swift pipeline's Resources)

@pytest.fixture(scope="module")
def xl_bundle(tmp_path_factory, xl_packages):
    """`torch2coreml --bundle-packages --zip` on tiny-xl with its refiner: the packages of xl_packages (copied, so
    the conversion reuses them: same flags) laid out as Resources/."""
    out = tmp_path_factory.mktemp("tiny_xl_bundle")
    for path in xl_packages.values():
        shutil.copytree(path, out / path.name)
    assert torch2coreml.main(["--model-version", "tiny-xl", "--refiner-version", "tiny-xl-refiner", "-o", str(out),
                              "--convert-text-encoder", "--convert-unet", "--convert-vae-decoder",
                              "--convert-vae-encoder", "--bundle-packages", "--zip"]) == 0
    return out / "Resources", next(out.glob("*.zip"))


def test_sdxl_bundle_has_apples_names_and_what_swift_needs(xl_bundle, xl_packages, xl):
    """Apple's SDXL Resources (StableDiffusionXL+Resources.swift: TextEncoder2, UnetRefiner) and, in
    pipeline_config.json, what the Swift SDXL pipeline reads: the family, force_zeros_for_empty_prompt, the second
    tokenizer's pad token, and what each of the base's and the refiner's time ids is."""
    from python_coreml_sd.components import TIME_IDS
    resources, archive = xl_bundle
    assert {p.name for p in resources.iterdir()} == {
        "TextEncoder.mlpackage", "TextEncoder2.mlpackage", "Unet.mlpackage", "UnetRefiner.mlpackage",
        "VAEDecoder.mlpackage", "VAEEncoder.mlpackage", "vocab.json", "merges.txt", "scheduler_config.json",
        "pipeline_config.json"}
    for component in ("text_encoder_2", "refiner"):
        package = resources / f"{TABLE[component].resource}.mlpackage"
        assert (package / "Manifest.json").read_bytes() == (xl_packages[component] / "Manifest.json").read_bytes()
    settings = json.loads((resources / "pipeline_config.json").read_text())
    tokenizer_2 = xl.load_tokenizer_2()
    vocab = json.loads((resources / "vocab.json").read_text(encoding="utf-8"))
    assert settings["family"] == SDXL and settings["vae_scaling_factor"] == xl.config("vae")["scaling_factor"]
    assert settings["force_zeros_for_empty_prompt"] is xl.index["force_zeros_for_empty_prompt"] is True
    # tokenizer_2 pads with "!" (id 0), the first tokenizer with its end token (49407)
    assert vocab[settings["tokenizer_2_pad_token"]] == tokenizer_2.pad_token_id == 0 != xl.load_tokenizer().pad_token_id
    unet_ids, refiner_ids = (declared(xl_packages[c])[0]["time_ids"][-1] for c in ("unet", "refiner"))
    assert settings["time_ids"] == list(TIME_IDS["unet"]) and len(settings["time_ids"]) == unet_ids == 6
    assert settings["refiner_time_ids"] == list(TIME_IDS["refiner"]) and len(settings["refiner_time_ids"]) == refiner_ids
    with zipfile.ZipFile(archive) as z:
        assert {"TextEncoder2.mlpackage", "UnetRefiner.mlpackage"} <= {n.split("/")[1] for n in z.namelist()}


def test_sdxl_bundle_generates_as_the_converted_folder(xl_bundle, pipes, tmp_path):
    """The Python pipeline reads the bundle (folder, and the zip extracted and checked) as it reads the converted
    folder: same image, refiner hand-off included, bit for bit."""
    from python_coreml_sd import bundle
    resources, archive = xl_bundle
    request = GenerationRequest("a red fox", seed=3, num_inference_steps=STEPS, scheduler="EulerDiscrete",
                                refiner_start=0.5)
    expected = pipes["mil"].generate(request).intermediates["final_latents"]
    for models_dir in (resources, bundle.extract_bundle(archive, tmp_path / "extracted")):
        bundled = open_pipeline("mil", models_dir, "tiny-xl", progress=False)
        np.testing.assert_array_equal(bundled.generate(request).intermediates["final_latents"], expected)


@pytest.mark.parametrize("written, expected", [
    (["o/Stable_Diffusion_version_m_refiner.mlpackage", "o/Stable_Diffusion_version_m_refiner_chunk1.mlpackage",
      "o/Stable_Diffusion_version_m_refiner_chunk2.mlpackage", "o/Stable_Diffusion_version_m_unet.mlpackage"],
     ["Unet", "UnetRefinerChunk1", "UnetRefinerChunk2"]),
    (["o/Stable_Diffusion_version_m_refiner.mlpackage", "o/Stable_Diffusion_version_m_text_encoder_2.mlpackage"],
     ["TextEncoder2", "UnetRefiner"]),
])
def test_chunked_refiner_is_bundled_as_its_chunks(written, expected):
    from python_coreml_sd import bundle
    assert sorted(bundle.resource_entries(written)) == expected


def test_bundle_refuses_sdxl_tokenizers_of_two_vocabularies(capsys, tmp_path, xl):
    """Resources hold one vocab.json + merges.txt for both encoders: another tokenizer_2 vocabulary is refused
    before any work, in one line."""
    model = copy_model(xl, tmp_path / "model")
    path = model / "tokenizer_2" / "tokenizer.json"  # transformers 5 saves the vocabulary there
    saved = json.loads(path.read_text(encoding="utf-8"))
    vocab = saved["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[1:3]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(saved), encoding="utf-8")
    code, err = run_main(capsys, "--model-version", str(model), "-o", str(tmp_path / "out"), "--convert-text-encoder",
                         "--bundle-packages")
    assert code == 2 and err.count("\n") == 0 and "tokenizer_2 has another vocab.json than its tokenizer" in err, err
    assert not (tmp_path / "out").exists()
