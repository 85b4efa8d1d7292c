"""Issue 17's leftovers: single-file inpainting checkpoints (9-channel conv_in, original layout) and the SD 2.x
base (epsilon) vs 768-v (v_prediction) choice (--prediction-type, else diffusers' heuristics)."""
import json

import pytest
import torch

from python_coreml_sd import registry, single_file
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.weights import read_header
from tests import ldm_layout
from tests.support import assert_one_line

COMPONENTS = ["text_encoder", "vae_decoder", "vae_encoder", "unet"]


@pytest.fixture(scope="module")
def inpaint_source():
    return resolve("tiny-inpaint")


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory, inpaint_source):
    path = tmp_path_factory.mktemp("inpaint_ckpt") / "tiny-inpainting.safetensors"
    ldm_layout.write_checkpoint(inpaint_source, path, "clip")
    return path


def _weights(package) -> bytes:
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()


def test_fixture_is_what_diffusers_from_single_file_reads(inpaint_checkpoint, inpaint_source):
    from diffusers import StableDiffusionInpaintPipeline
    pipe = StableDiffusionInpaintPipeline.from_single_file(str(inpaint_checkpoint), config=str(inpaint_source.root),
                                                           local_files_only=True, safety_checker=None)
    for component in ("unet", "text_encoder", "vae"):
        a, b = getattr(inpaint_source, f"load_{component}")().state_dict(), getattr(pipe, component).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), component


def test_inpainting_file_is_recognised_and_materialized_as_inpainting(inpaint_checkpoint, inpaint_source):
    found = single_file.recognise(inpaint_checkpoint, read_header(inpaint_checkpoint)["entries"])
    assert (found.family, found.variant, found.architecture["unet"]["in_channels"]) == ("tiny", "inpainting", 9)
    source = resolve(str(inpaint_checkpoint))
    assert source.pipeline_class == "StableDiffusionInpaintPipeline"
    assert source.config("unet")["in_channels"] == 9
    assert source.config("scheduler")["prediction_type"] == inpaint_source.config("scheduler")["prediction_type"]


def test_inpainting_file_converts_to_packages_identical_in_weights(tmp_path, inpaint_checkpoint):
    ours = convert(ConversionOptions(str(inpaint_checkpoint), tmp_path / "file"), COMPONENTS)
    folder = convert(ConversionOptions("tiny-inpaint", tmp_path / "folder"), COMPONENTS)
    assert len(ours) == len(folder) == len(COMPONENTS)
    for a, b in zip(ours, folder):
        assert _weights(a) == _weights(b), a.name


def _entries_of(family: str, in_channels: int = None) -> dict:
    """The header entries (name -> dtype, shape) of a `family` checkpoint in the SD 2.x original layout, built on the
    meta device: full-size architectures recognised without a byte of weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    arch = registry.family(family)["architecture"]
    if in_channels:
        arch["unet"]["in_channels"] = in_channels
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**arch["unet"]), AutoencoderKL(**arch["vae"])
        text = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
    state = ldm_layout.unet_to_ldm(unet.state_dict(), arch["unet"])
    state.update(ldm_layout.vae_to_ldm(vae.state_dict(), arch["vae"]))
    state.update(ldm_layout.open_clip_to_ldm(ldm_layout._text_state(text), arch["text_encoder"]["hidden_size"]))
    return {k: {"dtype": "F32", "shape": list(v.shape)} for k, v in state.items()}


@pytest.fixture(scope="module")
def sd2_entries():
    return _entries_of("sd2-v")


@pytest.mark.parametrize("asked, in_channels, global_step, expected", [
    (None, None, None, ("sd2-v", "v_prediction")),  # diffusers' default for SD 2.x files: 768-v (2.0 / 2.1)
    (None, None, 875000, ("sd2-base", "epsilon")),  # the SD 2 base .ckpt's training step
    (None, 9, None, ("sd2-base", "epsilon")),  # SD 2 inpainting: trained from the 512 base
    ("epsilon", None, None, ("sd2-base", "epsilon")),
    ("v_prediction", 9, None, ("sd2-v", "v_prediction")),  # the flag wins
])
def test_sd2_base_or_768_v(sd2_entries, asked, in_channels, global_step, expected):
    entries = _entries_of("sd2-v", in_channels) if in_channels else sd2_entries
    found = single_file.recognise("sd2.safetensors", entries, asked, global_step)
    assert (found.family, found.prediction_type) == expected
    assert registry.family(found.family)["architecture"]["unet"]["sample_size"] == (64 if "base" in found.family else 96)


def test_prediction_type_reaches_the_scheduler_of_a_test_family(tmp_path):
    """tiny-sd2 (v-prediction) has no epsilon twin: the flag sets its scheduler's prediction type."""
    from python_coreml_sd.random_models import materialized_model_dir
    path = tmp_path / "tiny-sd2.safetensors"
    ldm_layout.write_checkpoint(resolve(str(materialized_model_dir("tiny-sd2"))), path, "open_clip")
    assert resolve(str(path)).config("scheduler")["prediction_type"] == "v_prediction"
    source = resolve(str(path), prediction_type="epsilon")
    assert source.config("scheduler")["prediction_type"] == "epsilon"
    assert json.loads((source.root / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_ckpt_global_step_is_read(tmp_path, inpaint_checkpoint):
    from safetensors.torch import load_file
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(inpaint_checkpoint)), "global_step": 875000}, path)
    _, _, global_step = single_file.read_entries(path, allow_pickle=True)
    assert global_step == 875000


def test_prediction_type_on_a_folder_is_refused(tmp_path, capsys):
    from python_coreml_sd import torch2coreml
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--model-version", "tiny", "--prediction-type", "epsilon", "--convert-unet",
                           "-o", str(tmp_path / "out")])
    assert_one_line(exit_info.value.code, capsys.readouterr().err.strip(), "--prediction-type is for single-file",
                    prog="torch2coreml")
    assert not (tmp_path / "out").exists()


def test_pipeline_prediction_type_on_a_folder_is_refused(tmp_path, capsys):
    from tests.support import run_pipeline_cli
    code, err = run_pipeline_cli(capsys, "--prompt", "a cat", "--backend", "torch", "--model-version", "tiny",
                                 "--prediction-type", "epsilon", "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "--prediction-type is for single-file")
    assert not (tmp_path / "out").exists()


def test_sdxl_inpainting_file_is_recognised_and_converts_identically(tmp_path):
    """An SDXL inpainting checkpoint (SGM layout, 9-channel conv_in) is recognised as tiny-xl's inpainting
    variant and converts to the UNet of the tiny-xl-inpaint folder, byte for byte."""
    xl_inpaint = resolve("tiny-xl-inpaint")
    path = tmp_path / "tiny-xl-inpainting.safetensors"
    ldm_layout.write_checkpoint(xl_inpaint, path, "sdxl")
    found = single_file.recognise(path, read_header(path)["entries"])
    assert (found.variant, found.architecture["unet"]["in_channels"]) == ("inpainting", 9)
    assert resolve(str(path)).pipeline_class == xl_inpaint.pipeline_class
    ours = convert(ConversionOptions(str(path), tmp_path / "file"), ["unet"])
    folder = convert(ConversionOptions("tiny-xl-inpaint", tmp_path / "folder"), ["unet"])
    assert _weights(ours[0]) == _weights(folder[0])
