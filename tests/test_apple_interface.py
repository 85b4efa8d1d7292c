"""Our packages declare Apple's interface (ml-stable-diffusion at e12202c, python_coreml_stable_diffusion/
torch2coreml.py and chunk_mlprogram.py; docs/compat.md): input and output names, shapes and dtypes per
component and option, the VAE encoder's moments, and Apple's file names."""
import coremltools as ct
import numpy as np
import pytest
import torch

from python_coreml_sd.convert import ConversionOptions
from python_coreml_sd.convert.common import package_name
from python_coreml_sd.convert import convert

F16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
F32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32

# Apple's interface as its converter declares it, for a model with latent h x w, batch B (2, or 1 with
# --unet-batch-one), text hidden size D, sequence S, image H = 8h, CLIP image size P, C concepts.
# fp16 packages (Apple's default): every input FLOAT16 except input_ids; every output FLOAT32.
# FLOAT32 compute precision (Apple uses it for SDXL's VAE): every input FLOAT32.
def apple_interface(component, *, B=2, h=16, w=16, D=32, S=77, P=32, C=17, fp16=True):
    x = F16 if fp16 else F32
    table = {
        "text_encoder": ({"input_ids": ((1, S), F32)},
                         {"last_hidden_state": ((1, S, D), F32), "pooled_outputs": ((1, D), F32)}),
        "unet": ({"sample": ((B, 4, h, w), x), "timestep": ((B,), x), "encoder_hidden_states": ((B, D, 1, S), x)},
                 {"noise_pred": ((B, 4, h, w), F32)}),
        "vae_decoder": ({"z": ((1, 4, h, w), x)}, {"image": ((1, 3, 8 * h, 8 * w), F32)}),
        "vae_encoder": ({"x": ((1, 3, 8 * h, 8 * w), x)}, {"latent": ((1, 8, h, w), F32)}),
        "safety_checker": ({"clip_input": ((1, 3, P, P), x), "images": ((1, 8 * h, 8 * w, 3), x),
                            "adjustment": ((1,), x)},
                           {"filtered_images": ((1, 8 * h, 8 * w, 3), F32), "has_nsfw_concepts": ((1, 1, 1, 1), F32),
                            "concept_scores": ((1, C), F32)}),
    }
    return table[component]


def declared(path):
    spec = ct.utils.load_spec(str(path))
    describe = lambda features: {f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType)
                                 for f in features}
    return describe(spec.description.input), describe(spec.description.output)


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker"])
def test_fp16_packages_declare_apples_interface(tiny_fp16_packages, component):
    assert declared(tiny_fp16_packages[package_name("tiny", component)]) == apple_interface(component)


@pytest.fixture(scope="module")
def original_batch_one_chunked(tmp_path_factory, tiny_source):
    options = ConversionOptions("tiny", tmp_path_factory.mktemp("apple_unet"), attention_implementation="ORIGINAL",
                                unet_batch_one=True, chunk_unet=True)
    return convert(options, ["unet"])


def test_unet_original_attention_batch_one_and_chunks(original_batch_one_chunked):
    full, first, second = original_batch_one_chunked
    assert [p.name for p in original_batch_one_chunked] == [
        "Stable_Diffusion_version_tiny_unet.mlpackage", "Stable_Diffusion_version_tiny_unet_chunk1.mlpackage",
        "Stable_Diffusion_version_tiny_unet_chunk2.mlpackage"]
    unet_inputs, unet_outputs = apple_interface("unet", B=1)
    assert declared(full) == (unet_inputs, unet_outputs)
    # Apple's chunks: chunk 1 takes the UNet's own inputs; the tensors crossing the cut are FLOAT32
    # outputs of chunk 1 and FLOAT32 inputs of chunk 2, which also takes the UNet inputs it still needs.
    first_in, first_out = declared(first)
    second_in, second_out = declared(second)
    assert first_in.items() <= unet_inputs.items() and second_out == unet_outputs
    crossing = {k: v for k, v in second_in.items() if k not in unet_inputs}
    assert crossing == first_out and crossing and all(dtype == F32 for _, dtype in crossing.values())
    assert {k: v for k, v in second_in.items() if k in unet_inputs}.items() <= unet_inputs.items()


def test_fp32_precision_declares_float32_inputs(tmp_path, tiny_source):
    options = ConversionOptions("tiny", tmp_path, compute_precision="float32", latent_h=8, latent_w=8)
    paths = {p.name: p for p in convert(options, ["vae_encoder", "safety_checker"])}
    for component in ("vae_encoder", "safety_checker"):
        assert declared(paths[package_name("tiny", component)]) == apple_interface(component, h=8, w=8, fp16=False)


def test_vae_encoder_moments_match_diffusers(tiny_fp16_packages, tiny_source):
    """`latent` = diffusers' vae.encode(x).latent_dist.parameters (mean and log-variance) on the MIL runtime."""
    from python_coreml_sd.metrics import psnr
    from python_coreml_sd.runtime.mil import MILModel
    vae = tiny_source.load_vae().eval()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.parameters.numpy()
    moments = MILModel(str(tiny_fp16_packages[package_name("tiny", "vae_encoder")])).predict(
        {"x": x.numpy().astype(np.float16)})["latent"]
    assert moments.shape == expected.shape == (1, 8, 16, 16)
    assert psnr(expected, moments) >= 35


def test_sample_posterior_is_diffusers_sampling():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from python_coreml_sd.generation.pipeline import sample_posterior
    generator = torch.Generator().manual_seed(0)
    moments = torch.randn(1, 8, 4, 4, generator=generator) * 20  # log-variances beyond the clamp too
    noise = torch.randn(1, 4, 4, 4, generator=generator)
    dist = DiagonalGaussianDistribution(moments)
    np.testing.assert_allclose(sample_posterior(moments.numpy(), noise.numpy()),
                               (dist.mean + dist.std * noise).numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("model_version, expected", [
    ("tiny", "Stable_Diffusion_version_tiny_unet.mlpackage"),
    ("runwayml/stable-diffusion-v1-5", "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_unet.mlpackage"),
    ("/path/to/model", "Stable_Diffusion_version__path_to_model_unet.mlpackage"),
    ("/path/to/model/", "Stable_Diffusion_version__path_to_model__unet.mlpackage"),
    ("./models/sd", "Stable_Diffusion_version_._models_sd_unet.mlpackage"),
    ("~/sd", "Stable_Diffusion_version_~_sd_unet.mlpackage"),
])
def test_file_names_as_apple_derives_them(model_version, expected):
    assert package_name(model_version, "unet") == expected


def test_pipeline_finds_apple_and_older_names(tmp_path):
    from python_coreml_sd.generation.components import find_packages
    for name in ["Stable_Diffusion_version__path_to_model_unet.mlpackage",  # Apple's, local path
                 "Stable_Diffusion_version_model_vae_decoder.mlpackage",  # ours before: base name
                 "Stable_Diffusion_version__p__text_encoder.mlpackage",  # trailing slash
                 "Stable_Diffusion_version_a_b_unet_chunk1.mlpackage"]:
        (tmp_path / name).mkdir()
    assert sorted(find_packages(tmp_path)) == ["text_encoder", "unet", "unet_chunk1", "vae_decoder"]


def test_pipeline_feeds_each_input_as_declared(tiny_models_dir):
    """load_converted reads each package's input dtypes; predict casts to them (fp16 here, input_ids fp32)."""
    from python_coreml_sd.generation.components import Component, load_converted
    models = load_converted(tiny_models_dir, "mil")
    assert models["unet"].input_dtypes == {"sample": np.float16, "timestep": np.float16,
                                           "encoder_hidden_states": np.float16}
    assert models["text_encoder"].input_dtypes == {"input_ids": np.float32}
    assert models["vae_encoder"].input_dtypes == {"x": np.float16}

    class Recorder:
        def predict(self, inputs):
            self.seen = {k: v.dtype for k, v in inputs.items()}
            return {}
    recorder = Recorder()
    Component(recorder, {}, {"sample": np.float16}).predict({"sample": np.zeros(2, np.float32),
                                                             "other": np.zeros(2, np.float32)})
    assert recorder.seen == {"sample": np.float16, "other": np.float32}


def test_pipeline_still_drives_encoders_of_the_old_interface():
    """A VAE encoder converted before the moments interface (it samples and noises inside) gets the same
    draws in the same order, so the same seed gives the same latents as with a moments encoder."""
    from PIL import Image
    from transformers import CLIPTokenizer

    from python_coreml_sd.generation.components import Component
    from python_coreml_sd.generation.pipeline import GenerationRequest, StableDiffusionPipeline, sample_posterior
    from python_coreml_sd.testing import closed_form as cf
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    tokenizer = CLIPTokenizer(str(root / "models/tokenizer/vocab.json"), str(root / "models/tokenizer/merges.txt"))

    class OldEncoder:
        def predict(self, inputs):
            latents = np.float32(cf.LATENT_SCALE) * sample_posterior(cf.encode_image(inputs["sample"][0])[None],
                                                                     inputs["diagonal_noise"])
            a, b = (np.float32(inputs[k].reshape(-1)[0]) for k in ("sqrt_alphas_cumprod",
                                                                   "sqrt_one_minus_alphas_cumprod"))
            return {"latent_dist": a * latents + b * inputs["noise"]}

    request = GenerationRequest(prompt="a cat", seed=4, num_inference_steps=6,
                                image=Image.fromarray(cf.test_image_bytes(64, 64)), strength=0.6)
    latents = []
    for old in (False, True):
        models = cf.model_set(8)
        if old:
            models.components["vae_encoder"] = Component(OldEncoder(), {
                "sample": (1, 3, 64, 64), "diagonal_noise": (1, 4, 8, 8), "noise": (1, 4, 8, 8),
                "sqrt_alphas_cumprod": (1, 1), "sqrt_one_minus_alphas_cumprod": (1, 1)})
        pipeline = StableDiffusionPipeline(models, tokenizer, cf.SD_SCHEDULER_CONFIG, progress=False)
        latents.append(pipeline.generate(request).intermediates["final_latents"])
    np.testing.assert_array_equal(latents[0], latents[1])


def test_compiled_model_dtypes_come_from_its_metadata(tmp_path):
    """A .mlmodelc (Apple's Resources) declares its inputs in metadata.json; the pipeline casts to them."""
    import json

    from python_coreml_sd.generation.components import _package_inputs
    compiled = tmp_path / "Unet.mlmodelc"
    compiled.mkdir()
    (compiled / "metadata.json").write_text(json.dumps([{"inputSchema": [
        {"name": "sample", "dataType": "Float16", "shape": "[2, 4, 64, 64]"},
        {"name": "input_ids", "dataType": "Float32", "shape": "[1, 77]"}]}]))
    assert _package_inputs(compiled) == ({"sample": (2, 4, 64, 64), "input_ids": (1, 77)},
                                         {"sample": np.float16, "input_ids": np.float32}, {})
    (compiled / "metadata.json").write_text("not json")
    assert _package_inputs(compiled) == ({}, {}, {})
