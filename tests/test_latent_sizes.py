"""Issue 18: packages of several shapes (--latent-sizes, --max-prompt-chunks) through Core ML enumerated shapes.

One `tiny` conversion (UNet, VAE decoder, text encoder; two latent sizes by 1..3 prompt windows, iOS 18 for the
pairs) is run in the MIL runtime at each shape and compared with diffusers at that shape, with the bars of
tests/unet/test_convert.py (UNet: 40 dB) and tests/runtime/test_mil_cuda.py (VAE decoder: 35 dB)."""
import coremltools as ct
import numpy as np
import pytest
import torch

from python_coreml_sd import torch2coreml
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.convert.unet import diffusers_reference, sample_inputs
from python_coreml_sd.convert.vae import VAEDecoder
from python_coreml_sd.metrics import psnr
from python_coreml_sd.runtime.mil import MILModel
from python_coreml_sd.generation.pipeline import GenerationRequest
from tests.support import assert_one_line, run_pipeline_cli

SIZES = ((16, 16), (8, 24))  # tiny's own 16x16 the default; 8x24 a wide one (multiples of its 4x downsampling)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    options = ConversionOptions("tiny", tmp_path_factory.mktemp("sizes"), latent_sizes=SIZES, max_prompt_chunks=3,
                                min_deployment_target="iOS18")
    return {path.name.split("tiny_")[1].split(".")[0]: path
            for path in convert(options, ["text_encoder", "vae_decoder", "unet"])}


def enumerated(package) -> dict:
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    return {f.name: (tuple(f.type.multiArrayType.shape), [tuple(s.shape) for s in f.type.multiArrayType.enumeratedShapes.shapes])
            for f in spec.description.input if f.type.multiArrayType.WhichOneof("ShapeFlexibility")}, \
        spec.description.metadata.userDefined


def test_packages_enumerate_the_cross_product_default_first(packages):
    unet, meta = enumerated(packages["unet"])
    sizes = [(h, w) for h, w in SIZES for _ in range(3)]
    assert unet["sample"] == ((2, 4, 16, 16), [(2, 4, h, w) for h, w in sizes])
    # paired index by index with `sample` (iOS 18), as listed: coremltools' reordering is undone
    assert unet["encoder_hidden_states"] == ((2, 32, 1, 77), [(2, 32, 1, 77 * k) for _ in SIZES for k in (1, 2, 3)])
    assert meta["com.python_coreml_sd.latent_sizes"] == "16x16,8x24"
    assert meta["com.python_coreml_sd.max_prompt_chunks"] == "3"
    vae, _ = enumerated(packages["vae_decoder"])
    assert vae == {"z": ((1, 4, 16, 16), [(1, 4, 16, 16), (1, 4, 8, 24)])}
    assert enumerated(packages["text_encoder"])[0] == {}  # one window of 77 tokens, as before


@pytest.mark.parametrize("size, chunks", [((16, 16), 1), ((8, 24), 1), ((8, 24), 3)])
def test_unet_agrees_with_diffusers_at_each_shape(packages, tiny_source, size, chunks):
    unet = tiny_source.load_unet()
    inputs = sample_inputs(dict(unet.config), 2, *size, 77 * chunks)
    out = MILModel(str(packages["unet"])).predict({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
    assert out.shape == (2, 4, *size) and psnr(diffusers_reference(unet, inputs), out) >= 40


def test_vae_decoder_agrees_with_diffusers_at_each_size(packages, tiny_source):
    check_vae_decoder_sizes(tiny_source, packages["vae_decoder"], SIZES)


def check_vae_decoder_sizes(source, package, sizes):
    """The decoder package at each latent size against the PyTorch VAE decoder (also for tiny-xl)."""
    decoder, model = VAEDecoder(source.load_vae()).eval(), MILModel(str(package))
    for h, w in sizes:
        z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            reference = decoder(z).numpy()
        out = model.predict({"z": z.numpy()})["image"]
        assert out.shape == (1, 3, 8 * h, 8 * w) and psnr(reference, out) >= 35, (h, w)


@pytest.fixture(scope="module")
def pipe(packages):
    from python_coreml_sd.generation.setup import open_pipeline
    return open_pipeline("mil", packages["unet"].parent, progress=False)


def test_a_long_prompt_takes_more_windows_and_changes_the_prediction(pipe):
    words = " ".join(f"word{i} fox" for i in range(52))  # ~200 tokens: 3 windows of 75, none cut off
    ids = pipe.tokenizer(words, add_special_tokens=False).input_ids
    first = pipe.tokenizer.decode(ids[:75])
    assert pipe.prompt_chunk_counts == [1, 2, 3] and 150 < len(ids) <= 225
    cond, long = pipe.encode_prompts(words, "")
    _, short = pipe.encode_prompts(first, "")
    assert long.shape[-1] == 3 * 77 and short.shape[-1] == 77  # the empty negative prompt padded to the same count
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    noise_long, noise_short = (pipe.predict_noise(latents, 500, e, 7.5) for e in (long, short))
    assert psnr(noise_short, noise_long) < 30  # the tokens after the first 75 condition the UNet


def test_generation_at_another_size(pipe):
    from python_coreml_sd.generation.pipeline import GenerationRequest
    result = pipe.generate(GenerationRequest("a fox", num_inference_steps=2, height=64, width=192))
    assert result.image.size == (192, 64)
    assert pipe.generate(GenerationRequest("a fox", num_inference_steps=1)).image.size == (128, 128)


def test_a_size_the_models_lack_is_one_line(capsys, tmp_path, packages):
    code, err = run_pipeline_cli(capsys, "--prompt", "a fox", "-i", str(packages["unet"].parent), "-o",
                                 str(tmp_path / "o"), "--backend", "mil", "--num-inference-steps", "1",
                                 "--height", "128", "--width", "192")
    assert_one_line(code, err, "--height 128 --width 192", "128x128, 64x192")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("argv, fragment", [
    (["--convert-unet", "--latent-sizes", "16x16,16x10"], "--latent-sizes 16x10: 10 is not a multiple of 4"),
    (["--convert-unet", "--latent-sizes", ""], "--latent-sizes is empty"),
    (["--convert-vae-decoder", "--latent-sizes", "16x16,wide"], "'wide' is not HxW"),
    (["--convert-vae-decoder", "--latent-sizes", "16x16,600x8"], "--latent-sizes 600x8: 600 is larger than 512"),
    (["--convert-unet", "--latent-sizes", "aspect:wide"], "aspect:PIXELS takes a side in pixels"),
    (["--convert-unet", "--max-prompt-chunks", "0"], "--max-prompt-chunks: 0 must be at least 1"),
    (["--convert-unet", "--latent-sizes", "16x16,8x8", "--max-prompt-chunks", "2"], "need --min-deployment-target iOS18"),
    (["--convert-unet", "--latent-sizes", "16x16,8x8", "--latent-h", "8"], "either --latent-sizes or --latent-h"),
    # level 0: 16 and 17424 queries, which share no number of equal chunks of at most 512 (gcd 16 < 35)
    (["--convert-unet", "--latent-sizes", "4x4,132x132", "--attention-implementation", "SPLIT_EINSUM_V2"],
     "--latent-sizes 4x4,132x132 with SPLIT_EINSUM_V2: the attention at 1/1 of the latent has 4x4: 16, 132x132: "
     "17424 queries"),
    (["--convert-unet", "--max-prompt-chunks", "2", "--chunk-unet"], "--chunk-unet with several shapes needs "
                                                                      "--min-deployment-target iOS18"),
])
def test_bad_shape_flags_are_one_line_and_write_nothing(capsys, tmp_path, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--model-version", "tiny", "-o", str(tmp_path / "out"), *argv])
    assert_one_line(exit_info.value.code, capsys.readouterr().err.strip(), fragment, prog="torch2coreml")
    assert not (tmp_path / "out").exists()


def test_max_prompt_chunks_is_checked_in_the_library_too(tmp_path):
    from python_coreml_sd.errors import UserError
    with pytest.raises(UserError, match="at least 1"):
        convert(ConversionOptions("tiny", tmp_path / "out", max_prompt_chunks=0), ["unet"])
    with pytest.raises(UserError, match="pairs of whole numbers"):
        convert(ConversionOptions("tiny", tmp_path / "out", latent_sizes=((16, 16), (0, 8))), ["vae_decoder"])
    assert not (tmp_path / "out").exists()


def test_bundle_settings_list_the_sizes_and_prompt_windows():
    from python_coreml_sd import bundle
    settings = bundle.pipeline_settings(ConversionOptions("tiny", "out", latent_sizes=((8, 24), (16, 16)),
                                                          max_prompt_chunks=3))
    assert settings["latent_size"] == [8, 24] and settings["image_size"] == [64, 192]  # the default, first
    assert settings["latent_sizes"] == [[8, 24], [16, 16]] and settings["max_prompt_chunks"] == 3
    assert "latent_sizes" not in bundle.pipeline_settings(ConversionOptions("tiny", "out"))


def test_apps_read_the_sizes_and_prompt_windows_back():
    """bundle.shapes_of, the reading the Swift CLI does too (golden vectors of scripts/make_prompt_vectors.py)."""
    from python_coreml_sd import bundle
    settings = bundle.pipeline_settings(ConversionOptions("tiny", "out", latent_sizes=((8, 24), (16, 16)),
                                                          max_prompt_chunks=3))
    assert bundle.resources.shapes_of(settings) == {"latent_sizes": [[8, 24], [16, 16]], "prompt_chunk_counts": [1, 2, 3]}
    plain = bundle.pipeline_settings(ConversionOptions("tiny", "out"))
    assert bundle.resources.shapes_of(plain) == {"latent_sizes": [plain["latent_size"]], "prompt_chunk_counts": [1]}
    assert bundle.resources.shapes_of({}) == {"latent_sizes": [], "prompt_chunk_counts": [1]}


@pytest.mark.parametrize("attention, sizes, chunks", [("ORIGINAL", SIZES, 1), ("SPLIT_EINSUM_V2", (), 2)])
def test_other_attention_implementations_at_each_shape(tmp_path, tiny_source, attention, sizes, chunks):
    from python_coreml_sd.convert.unet import convert_unet
    options = ConversionOptions("tiny", tmp_path, latent_sizes=sizes, max_prompt_chunks=chunks,
                                attention_implementation=attention)
    model, unet = MILModel(str(convert_unet(tiny_source, options)[0])), tiny_source.load_unet()
    for size in options.sizes_or(16):
        for k in range(1, chunks + 1):
            inputs = sample_inputs(dict(unet.config), 2, *size, 77 * k)
            out = model.predict({name: v.numpy() for name, v in inputs.items()})["noise_pred"]
            assert psnr(diffusers_reference(unet, inputs), out) >= 40, (size, k)


V2_SIZES = ((16, 16), (32, 48))  # level 0: 256 and 1536 queries, both cut in 4 equal chunks (64 and 384)


def softmax_count(package) -> int:
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    return sum(op.type == "softmax" for op in block.operations)


def expected_softmaxes(config: dict, chunks_per_level: dict) -> int:
    """One softmax per head and query chunk of every attention layer of the Neural-Engine UNet."""
    from python_coreml_sd.layers.attention import CrossAttention
    from python_coreml_sd.layers.unet import UNet2DConditionModelANE
    with torch.device("meta"):
        model = UNet2DConditionModelANE(config, "SPLIT_EINSUM_V2")
    last = len(config["block_out_channels"]) - 1
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, CrossAttention):
            kind, index = name.split(".")[:2]  # down_blocks.i / up_blocks.i / mid_block (the last level)
            level = int(index) if kind == "down_blocks" else last - int(index) if kind == "up_blocks" else last
            total += module.heads * chunks_per_level.get(level, 1)
    return total


@pytest.mark.parametrize("family, sizes, chunks_per_level", [
    ("tiny", V2_SIZES, {0: 4}),
    ("tiny-xl", ((16, 16), (48, 48)), {1: 2}),  # attention from level 1: 64 and 576 queries, in 2 chunks
])
def test_split_einsum_v2_at_several_sizes_shares_its_query_chunks(tmp_path, family, sizes, chunks_per_level):
    """One program for every size: each attention level cuts its queries in the same number of equal chunks at
    each size, and agrees with diffusers there (the bar of the other implementations: 40 dB)."""
    from python_coreml_sd.convert.unet import convert_unet, text_pooled_width
    from python_coreml_sd.model_sources import resolve
    source = resolve(family)
    options = ConversionOptions(family, tmp_path, latent_sizes=sizes, attention_implementation="SPLIT_EINSUM_V2")
    package = convert_unet(source, options)[0]
    unet = source.load_unet()
    assert softmax_count(package) == expected_softmaxes(dict(unet.config), chunks_per_level)
    model = MILModel(str(package))
    for size in sizes:
        inputs = sample_inputs(dict(unet.config), 2, *size, 77, text_pooled_width(source))
        out = model.predict({name: v.numpy() for name, v in inputs.items()})["noise_pred"]
        assert out.shape == (2, 4, *size) and psnr(diffusers_reference(unet, inputs), out) >= 40, size


def test_vae_encoder_agrees_with_diffusers_at_each_size(tmp_path, tiny_source):
    from python_coreml_sd.convert.vae import VAEEncoder, convert_vae_encoder
    model = MILModel(str(convert_vae_encoder(tiny_source, ConversionOptions("tiny", tmp_path, latent_sizes=SIZES))[0]))
    encoder = VAEEncoder(tiny_source.load_vae()).eval()
    for h, w in SIZES:
        x = torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(w)) * 2 - 1
        with torch.no_grad():
            reference = encoder(x).numpy()
        out = model.predict({"x": x.numpy()})["latent"]
        assert out.shape == reference.shape and psnr(reference, out) >= 35, (h, w)


def test_aspect_shorthand_and_size_lists_parse():
    from python_coreml_sd.convert.options import parse_latent_sizes
    assert parse_latent_sizes("aspect:512") == ((64, 64), (56, 72), (72, 56), (48, 88), (88, 48))
    assert parse_latent_sizes(" 8x24, 16X16,8x24") == ((8, 24), (16, 16))  # in order, repeats dropped
    options = torch2coreml.options_from_args(torch2coreml.parser_spec().parse_args(
        ["--convert-unet", "--latent-sizes", "aspect:1024", "--max-prompt-chunks", "2"]))
    assert options.latent_sizes[0] == (128, 128) and len(options.latent_sizes) == 5 and options.max_prompt_chunks == 2


@pytest.fixture(scope="module")
def torch_pipe(packages):
    from python_coreml_sd.generation.setup import open_pipeline
    return open_pipeline("torch", packages["unet"].parent, progress=False)


def test_torch_backend_takes_the_converted_sizes_and_windows(torch_pipe, pipe):
    assert torch_pipe.latent_sizes == pipe.latent_sizes == [(16, 16), (8, 24)]
    assert torch_pipe.prompt_chunk_counts == pipe.prompt_chunk_counts == [1, 2, 3]
    words = " ".join(f"word{i} fox" for i in range(52))
    request = GenerationRequest(words, num_inference_steps=2, height=64, width=192, seed=3)
    reference, converted = torch_pipe.generate(request), pipe.generate(request)
    assert reference.image.size == converted.image.size == (192, 64)
    assert reference.intermediates["text_embeddings"].shape[-1] == 3 * 77
    assert psnr(reference.intermediates["final_latents"], converted.intermediates["final_latents"]) >= 30


def test_torch_backend_without_converted_models_takes_the_requested_size(capsys, tmp_path):
    from python_coreml_sd.generation.setup import open_pipeline
    pipe = open_pipeline("torch", None, "tiny", progress=False, sizes=((64, 192),))
    assert pipe.generate(GenerationRequest("a fox", num_inference_steps=1, height=64, width=192)).image.size == (192, 64)
    capsys.readouterr()  # the library call's loading bars (run alone, nothing has quieted transformers yet)
    code, err = run_pipeline_cli(capsys, "--prompt", "a fox", "--backend", "torch", "-o", str(tmp_path / "o"),
                                 "--num-inference-steps", "1", "--height", "72", "--width", "128")
    assert_one_line(code, err, "--height 72 --width 128", "multiples of 32 pixels")
    assert not (tmp_path / "o").exists()


def test_torch_backend_without_converted_models_takes_a_long_prompt_whole():
    """No package fixes the context there (diffusers' UNet takes any length): a ~200-token prompt fills 3 windows,
    each the PyTorch text encoder's on its 75 tokens with begin, end and padding (compel / A1111), the empty negative
    padded to as many, and the image differs from that of its first 75 tokens alone."""
    import warnings
    from python_coreml_sd.generation.setup import open_pipeline
    from python_coreml_sd.model_sources import resolve
    pipe = open_pipeline("torch", None, "tiny", progress=False)
    words = " ".join(f"word{i} fox" for i in range(52))
    tokenizer = pipe.tokenizer
    ids = tokenizer(words, add_special_tokens=False).input_ids
    assert 150 < len(ids) <= 225
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing truncated
        cond, pair = pipe.encode_prompts(words, "")
    rows = [[tokenizer.bos_token_id, *ids[i:i + 75], tokenizer.eos_token_id] for i in range(0, len(ids), 75)]
    rows = torch.tensor([row + [tokenizer.pad_token_id] * (77 - len(row)) for row in rows])
    encoder = resolve("tiny").load_text_encoder()
    with torch.no_grad():
        reference = torch.cat([encoder(row[None]).last_hidden_state for row in rows], dim=1).numpy()
    assert cond.shape[-1] == pair.shape[-1] == 3 * 77 and pair.shape[0] == 2
    assert psnr(reference, cond[:, :, 0, :].swapaxes(1, 2)) >= 60
    first = tokenizer.decode(ids[:75])
    long, short = (pipe.generate(GenerationRequest(text, num_inference_steps=2, seed=1)) for text in (words, first))
    assert long.intermediates["text_embeddings"].shape[-1] == 3 * 77
    assert short.intermediates["text_embeddings"].shape[-1] == 77
    assert psnr(np.asarray(short.image, np.float32), np.asarray(long.image, np.float32)) < 40


def test_parity_cli_at_another_size(tmp_path, packages):
    import json
    from python_coreml_sd import parity
    out = tmp_path / "report"
    assert parity.main(["--prompt", "a red fox", "-i", str(packages["unet"].parent), "-o", str(out), "--height", "64",
                        "--width", "192", "--num-inference-steps", "2"]) == 0
    (entry,) = json.loads((out / "report.json").read_text())["results"]
    assert entry["passed"] and {"first_noise_pred", "final_latents", "final_image"} <= set(entry["psnr_db"])


def test_chunked_unet_takes_every_shape_as_the_whole(tmp_path, packages, pipe):
    """--chunk-unet with --latent-sizes and --max-prompt-chunks (iOS 18): both chunks enumerate their inputs' shapes
    in the whole UNet's order, chunk 2 its crossing tensors at the shapes chunk 1 gives them; the pipeline on the
    chunks alone takes the same sizes and windows and makes the whole UNet's image."""
    import shutil
    from python_coreml_sd.generation.setup import open_pipeline
    options = ConversionOptions("tiny", tmp_path / "c", latent_sizes=SIZES, max_prompt_chunks=3, chunk_unet=True,
                                min_deployment_target="iOS18")
    whole, *chunks = convert(options, ["unet"])
    first, _ = enumerated(chunks[0])
    second, _ = enumerated(chunks[1])
    assert first["sample"] == enumerated(whole)[0]["sample"] and len(second) > 1
    assert all(len(shapes) == len(SIZES) * 3 for _, shapes in second.values())
    folder = tmp_path / "chunked"
    folder.mkdir()
    for path in (*chunks, packages["text_encoder"], packages["vae_decoder"]):
        shutil.copytree(path, folder / path.name)
    chunked = open_pipeline("mil", folder, progress=False)
    assert "unet" not in chunked.models and chunked.latent_sizes == pipe.latent_sizes
    assert chunked.prompt_chunk_counts == [1, 2, 3]
    request = GenerationRequest(" ".join(f"word{i} fox" for i in range(52)), num_inference_steps=2, height=64,
                                width=192)
    whole, cut = pipe.generate(request), chunked.generate(request)
    # fp16 rounding apart (the chunk boundary hands NCHW arrays to layers that get channels-last tensors in the
    # whole): the decoded images and latents >= 60 dB, the PNGs two levels apart at most (2 seen)
    for name in ("decoded_image", "final_latents"):
        assert psnr(whole.intermediates[name], cut.intermediates[name]) >= 60, name
    assert np.abs(np.asarray(whole.image, np.int16) - np.asarray(cut.image, np.int16)).max() <= 2


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory, packages):
    """The controlled UNet and tiny-controlnet at both sizes by 1..2 windows (iOS 18), beside `packages`' text
    encoder and VAE decoder."""
    import shutil
    out = tmp_path_factory.mktemp("control_sizes")
    common = dict(latent_sizes=SIZES, max_prompt_chunks=2, min_deployment_target="iOS18")
    convert(ConversionOptions("tiny", out, controlnets=("tiny-controlnet",), **common), ["controlnet"])
    convert(ConversionOptions("tiny", out, unet_support_controlnet=True, **common), ["unet"])
    for name in ("text_encoder", "vae_decoder"):
        shutil.copytree(packages[name], out / packages[name].name)
    return out


@pytest.mark.parametrize("size, chunks", [((16, 16), 1), ((8, 24), 2)])
def test_controlnet_and_controlled_unet_agree_with_diffusers_at_each_shape(control_dir, tiny_source, size, chunks):
    from python_coreml_sd.controlnets import resolve_controlnet
    from python_coreml_sd.convert.controlnet import example_inputs
    from python_coreml_sd.convert.unet import residual_inputs
    from python_coreml_sd.layers.unet import DiffusersControlNet
    config, unet = tiny_source.config("unet"), tiny_source.load_unet()
    inputs = example_inputs(config, 2, *size, 77 * chunks)
    with torch.no_grad():
        reference = DiffusersControlNet(resolve_controlnet("tiny-controlnet").load())(*inputs.values())
    out = MILModel(str(control_dir / "ControlNet_tiny-controlnet.mlpackage")).predict(
        {k: v.numpy() for k, v in inputs.items()})
    assert all(psnr(ref.numpy(), got) >= 40 for ref, got in zip(reference, out.values()))
    unet_inputs = sample_inputs(dict(unet.config), 2, *size, 77 * chunks)
    unet_inputs.update(residual_inputs(config, unet_inputs))
    noise = MILModel(str(control_dir / "Stable_Diffusion_version_tiny_control-unet.mlpackage")).predict(
        {k: v.numpy() for k, v in unet_inputs.items()})["noise_pred"]
    assert noise.shape == (2, 4, *size) and psnr(diffusers_reference(unet, unet_inputs), noise) >= 40


def test_controlnet_generation_at_another_size_matches_torch(control_dir):
    from PIL import Image
    from python_coreml_sd.generation.setup import open_pipeline
    edges = Image.fromarray((np.indices((64, 192)).sum(0) // 16 % 2 * 255).astype(np.uint8)).convert("RGB")
    request = GenerationRequest("a house", num_inference_steps=2, height=64, width=192, control_image=edges)
    results = [open_pipeline(backend, control_dir, progress=False, controlnet="tiny-controlnet").generate(request)
               for backend in ("mil", "torch")]
    assert results[0].image.size == (192, 64)
    assert psnr(results[1].intermediates["final_latents"], results[0].intermediates["final_latents"]) >= 30


def test_controlnets_of_several_sizes_need_ios18(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--model-version", "tiny", "-o", str(tmp_path / "out"), "--convert-controlnet",
                           "tiny-controlnet", "--latent-sizes", "16x16,8x24"])
    assert_one_line(exit_info.value.code, capsys.readouterr().err.strip(), "ControlNets", "iOS18", prog="torch2coreml")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_full_size_sd1_unet_at_two_sizes_agrees_with_diffusers(tmp_path):
    """SD 1.5's architecture with random weights (3.4 GB fp32), fp16 package of 64x64 and 48x80 latents, each size
    vs diffusers in fp32 (the 40 dB bar of the tiny tests). Minutes and ~12 GB of memory: -m slow."""
    import json
    from python_coreml_sd import registry
    from python_coreml_sd.convert.unet import convert_unet
    from python_coreml_sd.model_sources import ModelSource
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    UNet2DConditionModel(**registry.family("sd1")["architecture"]["unet"]).save_pretrained(str(tmp_path / "m" / "unet"))
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    source = ModelSource("sd1-random", tmp_path / "m")
    sizes = ((64, 64), (48, 80))
    (tmp_path / "out").mkdir()
    (package,) = convert_unet(source, ConversionOptions("sd1-random", tmp_path / "out", latent_sizes=sizes))
    model, unet = MILModel(str(package)), source.load_unet()
    for size in sizes:
        inputs = sample_inputs(dict(unet.config), 2, *size, 77)
        out = model.predict({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
        assert out.shape == (2, 4, *size) and psnr(diffusers_reference(unet, inputs), out) >= 40, size
