"""fp16 VAE without overflow (issue 16; Apple's ml-stable-diffusion #304): a VAE whose activations exceed fp16's
range, as SDXL's do, converts with its residual stream divided by powers of two (convert/vae_fp16.py) and
matches its fp32 self on the MIL runtime; the plain fp16 conversion of the same VAE does not."""
import numpy as np
import pytest
import torch

from python_coreml_sd.convert import ConversionOptions, convert, vae_fp16
from python_coreml_sd.convert.vae import STREAM_SCALE_KEY, VAEDecoder, VAEEncoder, decoder_inputs, encoder_inputs
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.runtime import load_model

# Input seed of the comparisons: not the conversion's (0), whose activations chose the scales.
SEED = 1


def heat(vae, factor: float):
    """Make `vae` overflow fp16 as SDXL's does: the residual stream of the decoder's later up blocks and the
    encoder's later down blocks grows to thousands (each resnet's conv2 times `factor`, not a power of two)."""
    with torch.no_grad():
        for block in [*vae.decoder.up_blocks[1:], *vae.encoder.down_blocks[2:]]:
            for resnet in block.resnets:
                resnet.conv2.weight.mul_(factor), resnet.conv2.bias.mul_(factor)
    return vae


def hot_vae_dir(tmp_path_factory, vae, factor: float):
    folder = tmp_path_factory.mktemp("hot_vae")
    heat(vae, factor).save_pretrained(str(folder), safe_serialization=True)
    return folder


def inputs_of(vae, component: str, size: tuple, seed: int = SEED) -> dict:
    """As the converter's sample inputs (the decoder's scaled like real latents), from another seed."""
    return (decoder_inputs if component == "vae_decoder" else encoder_inputs)(vae, *size, seed=seed)


def module_of(vae, component: str):
    return (VAEDecoder(vae) if component == "vae_decoder" else VAEEncoder(vae)).eval()


def reference(vae, component: str, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return module_of(vae, component)(*inputs.values()).numpy()


def mil(package, inputs: dict) -> np.ndarray:
    model = load_model(package, backend="mil")
    return next(iter(model.predict({k: v.numpy() for k, v in inputs.items()}).values()))


def metadata(package) -> dict:
    import coremltools as ct
    return dict(ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata)


@pytest.fixture(scope="module")
def hot_folder(tmp_path_factory):
    """tiny-xl's VAE heated: its GroupNorm inputs reach ~5000 (fp16 squares overflow from 256 on)."""
    return hot_vae_dir(tmp_path_factory, resolve("tiny-xl").load_vae(), 1000.0)


@pytest.fixture(scope="module")
def hot_vae(hot_folder):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(str(hot_folder)).eval()


@pytest.fixture(scope="module")
def hot(tmp_path_factory, hot_folder):
    """tiny-xl with the heated VAE, converted plain (no rescaling: SAFE_PEAK infinite) and as the converter does,
    with --check-output-correctness (which fails the conversion under 35 dB)."""
    packages = {}
    for label in ("plain", "rescaled"):
        out = tmp_path_factory.mktemp(label)
        saved = vae_fp16.SAFE_PEAK
        vae_fp16.SAFE_PEAK = float("inf") if label == "plain" else saved
        try:
            paths = convert(ConversionOptions("tiny-xl", out, custom_vae_version=str(hot_folder),
                                              check_output_correctness=label == "rescaled"),
                            ["vae_decoder", "vae_encoder"])
        finally:
            vae_fp16.SAFE_PEAK = saved
        packages[label] = dict(zip(("vae_decoder", "vae_encoder"), paths))
    return packages


@pytest.mark.parametrize("component", ["vae_decoder", "vae_encoder"])
def test_the_hot_vae_overflows_fp16_plainly_and_not_rescaled(hot, hot_vae, component):
    inputs = inputs_of(hot_vae, component, (16, 16))
    ref = reference(hot_vae, component, inputs)
    peak = max(vae_fp16.norm_input_peaks(module_of(hot_vae, component), tuple(inputs.values())).values())
    assert peak > 256  # (x - mean)^2 passes fp16's 65504 inside GroupNorm
    plain, rescaled = (mil(hot[label][component], inputs) for label in ("plain", "rescaled"))
    plain_psnr = psnr(ref, plain) if np.isfinite(plain).all() else float("nan")
    print(f"{component}: GroupNorm peak {peak:.0f}, plain fp16 {plain_psnr:.1f} dB, rescaled {psnr(ref, rescaled):.1f} dB")
    assert not plain_psnr >= 30, plain_psnr
    assert psnr(ref, rescaled) >= 35
    assert STREAM_SCALE_KEY not in metadata(hot["plain"][component])
    scales = [int(s) for s in metadata(hot["rescaled"][component])[STREAM_SCALE_KEY].split(",")]
    assert max(scales) > 1 and all(s & (s - 1) == 0 for s in scales)  # powers of two


def test_rescaled_module_is_the_original_in_fp32(hot_vae):
    module = VAEDecoder(hot_vae).eval()
    (z,) = inputs_of(hot_vae, "vae_decoder", (16, 16)).values()
    scaled, scales = vae_fp16.fp16_safe(module, "decoder", (z,), "vae_decoder")
    assert scaled is not module and len(scales) == len(hot_vae.decoder.up_blocks)
    with torch.no_grad():
        expected, got = module(z), scaled(z)
        # ... and its stream (each GroupNorm's input) fits fp16 with room: the largest is under SAFE_PEAK
        assert max(vae_fp16.norm_input_peaks(scaled, (z,)).values()) <= vae_fp16.SAFE_PEAK
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("family", ["tiny", "tiny-xl"])
def test_vaes_that_fit_fp16_are_left_as_they_are(family):
    vae = resolve(family).load_vae()
    module = VAEDecoder(vae).eval()
    assert vae_fp16.fp16_safe(module, "decoder", tuple(inputs_of(vae, "vae_decoder", (16, 16)).values()),
                              "vae_decoder") == (module, None)


def test_tiny_xl_decoder_matches_fp32_at_latent_scale(tmp_path):
    xl = resolve("tiny-xl")
    [package] = convert(ConversionOptions("tiny-xl", tmp_path), ["vae_decoder"])
    vae = xl.load_vae()
    inputs = inputs_of(vae, "vae_decoder", (16, 16))
    assert inputs["z"].abs().max() > 20  # latents / 0.13025
    assert psnr(reference(vae, "vae_decoder", inputs), mil(package, inputs)) >= 35


@pytest.mark.slow
def test_full_size_sdxl_vae_hot_and_as_drawn(tmp_path_factory):
    """The full-size SDXL VAE architecture (random weights, as drawn and heated), decoder at 32x32 latents (256 px,
    to keep CPU time in minutes): fp16 on the MIL runtime >= 35 dB against fp32. Minutes, a few GB: -m slow."""
    from diffusers import AutoencoderKL
    from python_coreml_sd import registry
    arch = registry.family("sdxl")["architecture"]["vae"]
    for factor in (None, 1000.0):
        torch.manual_seed(0)
        vae = AutoencoderKL(**arch).eval()
        if factor:
            heat(vae, factor)
        folder = tmp_path_factory.mktemp("sdxl_vae")
        vae.save_pretrained(str(folder), safe_serialization=True)
        out = tmp_path_factory.mktemp("sdxl_vae_out")
        [package] = convert(ConversionOptions("tiny-xl", out, custom_vae_version=str(folder), latent_h=32,
                                              latent_w=32), ["vae_decoder"])
        inputs = inputs_of(vae, "vae_decoder", (32, 32))
        value = psnr(reference(vae, "vae_decoder", inputs), mil(package, inputs))
        print(f"full-size SDXL VAE decoder, factor {factor}: {value:.1f} dB, scales "
              f"{metadata(package).get(STREAM_SCALE_KEY)}")
        assert value >= 35


def test_a_rescaling_that_changes_the_output_is_refused(hot_vae, monkeypatch):
    """The rescaled copy is checked in fp32 against the original: a VAE the rescaling does not know (here: a
    rescaling that forgets the resnets) is one UserError pointing at --compute-precision float32, not a package."""
    from python_coreml_sd.errors import UserError
    monkeypatch.setattr(vae_fp16, "scale_stream", lambda part, scales, peaks, component: part.conv_in.weight.data.mul_(0.5))
    (z,) = inputs_of(hot_vae, "vae_decoder", (16, 16)).values()
    with pytest.raises(UserError, match="--compute-precision float32"):
        vae_fp16.fp16_safe(VAEDecoder(hot_vae).eval(), "decoder", (z,), "vae_decoder")
