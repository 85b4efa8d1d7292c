"""Issue 18 on SDXL (`tiny-xl`): long prompts in windows for both text encoders and packages of several latent sizes.

One conversion (text encoders, UNet, VAE decoder; two latent sizes by 1..3 prompt windows, iOS 18 for the pairs),
run in the MIL runtime: the UNet and VAE decoder against diffusers at each shape (bars of tests/test_latent_sizes.py:
UNet 40 dB, VAE 35 dB), a long prompt's embeddings against the PyTorch encoders windowed as compel / A1111 do."""
import numpy as np
import pytest
import torch

from python_coreml_sd.components import component_of
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.convert.unet import diffusers_reference, sample_inputs, text_pooled_width
from python_coreml_sd.generation.pipeline import GenerationRequest
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.runtime.mil import MILModel
from tests.test_latent_sizes import check_vae_decoder_sizes, enumerated

SIZES = ((16, 16), (8, 24))  # tiny-xl's own 16x16 the default; 8x24 a wide one (multiples of its 2x downsampling)
CHUNKS = 3
LONG = " ".join(f"word{i} fox" for i in range(52))  # ~200 tokens: 3 windows of 75, none cut off


@pytest.fixture(scope="module")
def xl():
    return resolve("tiny-xl")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    options = ConversionOptions("tiny-xl", tmp_path_factory.mktemp("xl_sizes"), latent_sizes=SIZES,
                                max_prompt_chunks=CHUNKS, min_deployment_target="iOS18")
    return {component_of(path): path for path in convert(options, ["text_encoder", "unet", "vae_decoder"])}


@pytest.fixture(scope="module")
def pipe(packages):
    from python_coreml_sd.generation.setup import open_pipeline
    return open_pipeline("mil", packages["unet"].parent, "tiny-xl", progress=False)


def test_unet_enumerates_sample_and_context_and_fixes_the_added_conditions(packages):
    shapes, meta = enumerated(packages["unet"])
    assert set(shapes) == {"sample", "encoder_hidden_states"}  # time_ids and text_embeds: one shape each
    assert shapes["encoder_hidden_states"][1] == [(2, 96, 1, 77 * k) for _ in SIZES for k in range(1, CHUNKS + 1)]
    assert shapes["sample"][1] == [(2, 4, h, w) for h, w in SIZES for _ in range(CHUNKS)]
    assert meta["com.python_coreml_sd.max_prompt_chunks"] == str(CHUNKS)


@pytest.mark.parametrize("size, chunks", [((16, 16), 1), ((8, 24), 1), ((16, 16), 3), ((8, 24), 2)])
def test_unet_agrees_with_diffusers_at_each_shape(packages, xl, size, chunks):
    unet = xl.load_unet()
    inputs = sample_inputs(dict(unet.config), 2, *size, 77 * chunks, text_pooled_width(xl))
    out = MILModel(str(packages["unet"])).predict({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
    assert out.shape == (2, 4, *size) and psnr(diffusers_reference(unet, inputs), out) >= 40


def test_vae_decoder_agrees_with_diffusers_at_each_size(packages, xl):
    check_vae_decoder_sizes(xl, packages["vae_decoder"], SIZES)


def windowed_reference(xl, pipe, text: str, count: int) -> dict:
    """compel / A1111 on the PyTorch encoders: 75-token windows with begin, end and padding, each encoder's
    penultimate states per window, side by side on channels, windows concatenated; pooled from the first window."""
    states, pooled = {}, None
    encoders = {"text_encoder": (pipe.tokenizer, xl.load_text_encoder()),
                "text_encoder_2": (pipe.tokenizer_2, xl.load_text_encoder_2())}
    for name, (tokenizer, encoder) in encoders.items():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pad = tokenizer.pad_token_id
        rows = [[tokenizer.bos_token_id, *ids[i:i + 75], tokenizer.eos_token_id] for i in range(0, 75 * count, 75)]
        rows = torch.tensor([row + [pad] * (77 - len(row)) for row in rows])
        with torch.no_grad():
            outs = [encoder(row[None], output_hidden_states=True) for row in rows]
        states[name] = torch.cat([out.hidden_states[-2] for out in outs], dim=1).numpy()
        pooled = outs[0].text_embeds.numpy() if name == "text_encoder_2" else pooled
    return {"states": np.concatenate([states["text_encoder"], states["text_encoder_2"]], axis=-1), "pooled": pooled}


def test_long_prompt_embeddings_are_the_windowed_pytorch_ones(pipe, xl):
    assert pipe.prompt_chunk_counts == [1, 2, 3]
    cond, uncond = pipe.encode_xl_pair(GenerationRequest(LONG, negative_prompt="blurry"))
    for encoded, text in ((cond, LONG), (uncond, "blurry")):  # the negative padded to the prompt's 3 windows
        reference = windowed_reference(xl, pipe, text, CHUNKS)
        states = encoded["text_embeddings"][:, :, 0, :].swapaxes(1, 2)
        assert states.shape == reference["states"].shape == (1, 3 * 77, 96)
        assert psnr(reference["states"], states) >= 40 and psnr(reference["pooled"], encoded["pooled_embeddings"]) >= 40


def test_a_long_prompt_changes_the_prediction_vs_its_first_75_tokens(pipe):
    ids = pipe.tokenizer(LONG, add_special_tokens=False).input_ids
    assert 150 < len(ids) <= 225
    first = pipe.tokenizer.decode(ids[:75])
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    noise = {}
    for text in (LONG, first):
        embeddings, added, _ = pipe.conditioning(GenerationRequest(text))
        noise[text] = pipe.predict_noise(latents, 500, embeddings, 5.0, added)
    assert embeddings.shape[-1] == 77 and psnr(noise[first], noise[LONG]) < 30


def test_long_prompt_generation_at_the_wide_size(pipe):
    result = pipe.generate(GenerationRequest(LONG, negative_prompt="blurry", num_inference_steps=2, height=64,
                                             width=192))
    assert result.image.size == (192, 64)
