"""--model-version FILE: single-file checkpoints written here from `tiny` / `tiny-sd2` in the original
(CompVis / Stability) key layout convert like the diffusers folder; bad files are one line, exit 2."""
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.convert.common import package_name
from python_coreml_sd.errors import UserError
from tests import ldm_layout
from tests.support import assert_one_line


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_source):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-original.safetensors"
    ldm_layout.write_checkpoint(tiny_source, path, "clip")
    return path


def _weights(package: Path) -> bytes:
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()


def test_single_file_converts_to_packages_identical_in_weights(tmp_path, tiny_checkpoint, tiny_fp16_packages):
    components = ["text_encoder", "vae_decoder", "vae_encoder", "unet"]
    written = convert(ConversionOptions(str(tiny_checkpoint), tmp_path), components)
    assert len(written) == len(components)
    for component, package in zip(components, written):
        assert package.name == package_name(str(tiny_checkpoint), component)
        assert _weights(package) == _weights(tiny_fp16_packages[package_name("tiny", component)]), component


@pytest.mark.parametrize("family,layout", [("tiny", "clip"), ("tiny-sd2", "open_clip"), ("tiny-xl", "sdxl"),
                                           ("tiny-xl-refiner", "sdxl")])
def test_family_recognised_and_weights_mapped_exactly(tmp_path, family, layout):
    from python_coreml_sd import single_file
    from python_coreml_sd.model_sources import ModelSource, resolve
    from python_coreml_sd.random_models import materialized_model_dir

    source = resolve(str(materialized_model_dir(family)))
    path = tmp_path / f"{family}.safetensors"
    ldm_layout.write_checkpoint(source, path, layout)
    from python_coreml_sd.weights import read_header
    found = single_file.recognise(path, read_header(path)["entries"])
    assert (found.family, found.variant) == (family, "")
    converted = ModelSource(str(path), single_file.materialize(path))
    assert converted.config("scheduler")["prediction_type"] == source.config("scheduler")["prediction_type"]
    assert (converted.pipeline_class, converted.interface, converted.is_refiner) == (
        source.pipeline_class, source.interface, source.is_refiner)
    assert found.components == tuple(c for c in ("unet", "text_encoder", "text_encoder_2", "vae") if source.has(c))
    for component in found.components:
        a, b = (getattr(s, f"load_{component}")().state_dict() for s in (source, converted))
        assert set(a) == set(b), component
        assert all(torch.equal(a[k], b[k]) for k in a), component


def _header_only(path: Path, names_shapes: dict) -> Path:
    """A valid safetensors file of fp16 zeros with these names and shapes."""
    from safetensors.torch import save_file
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in names_shapes.items()}, str(path))
    return path


def test_inpainting_variant_is_recognised(tiny_checkpoint):
    from python_coreml_sd import single_file
    from python_coreml_sd.weights import read_header
    entries = dict(read_header(tiny_checkpoint)["entries"])
    conv_in = dict(entries["model.diffusion_model.input_blocks.0.0.weight"])
    conv_in["shape"] = [conv_in["shape"][0], 9, *conv_in["shape"][2:]]
    entries["model.diffusion_model.input_blocks.0.0.weight"] = conv_in
    found = single_file.recognise(tiny_checkpoint, entries)
    assert (found.family, found.variant, found.architecture["unet"]["in_channels"]) == ("tiny", "inpainting", 9)


def _cli(capsys, *argv):
    from python_coreml_sd import torch2coreml
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def xl_checkpoint(tmp_path_factory):
    from python_coreml_sd.model_sources import resolve
    path = tmp_path_factory.mktemp("xl_ckpt") / "tiny-xl-original.safetensors"
    ldm_layout.write_checkpoint(resolve("tiny-xl"), path, "sdxl")
    return path


def test_sdxl_fixture_is_what_diffusers_from_single_file_reads(xl_checkpoint):
    """The SGM layout written by tests/ldm_layout.py is the one diffusers' own SDXL single-file loader
    reads (offline: the tiny-xl folder as its config): it loads the tiny-xl weights back exactly."""
    from diffusers import StableDiffusionXLPipeline

    from python_coreml_sd.model_sources import resolve
    source = resolve("tiny-xl")
    pipe = StableDiffusionXLPipeline.from_single_file(str(xl_checkpoint), config=str(source.root),
                                                      local_files_only=True)
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(source, f"load_{component}")().state_dict(), getattr(pipe, component).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), component


def test_sdxl_single_file_converts_to_packages_identical_in_weights(tmp_path, xl_checkpoint):
    components = ["text_encoder", "unet"]  # --convert-text-encoder writes both SDXL encoders
    ours = convert(ConversionOptions(str(xl_checkpoint), tmp_path / "file"), components)
    folder = convert(ConversionOptions("tiny-xl", tmp_path / "folder"), components)
    assert len(ours) == len(folder) == 3
    for a, b in zip(ours, folder):
        assert _weights(a) == _weights(b), a.name


def test_unknown_family_is_refused(tmp_path, capsys):
    path = _header_only(tmp_path / "other.safetensors", {"transformer.blocks.0.weight": (4, 4)})
    out = tmp_path / "out"
    code, err = _cli(capsys, "--convert-unet", "--model-version", str(path), "-o", str(out))
    assert_one_line(code, err, "unknown model family", prog="torch2coreml")
    assert not out.exists()


def test_shapes_of_no_known_architecture_are_refused(tmp_path, capsys, tiny_checkpoint):
    from safetensors.torch import load_file, save_file
    state = load_file(str(tiny_checkpoint))
    key = "model.diffusion_model.time_embed.0.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    code, err = _cli(capsys, "--convert-unet", "--model-version", str(path), "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "match no known architecture", prog="torch2coreml")


def test_truncated_header_is_refused(tmp_path, capsys, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:8 + length // 2])
    out = tmp_path / "out"
    code, err = _cli(capsys, "--convert-unet", "--model-version", str(path), "-o", str(out))
    assert_one_line(code, err, "not a valid safetensors file", prog="torch2coreml")
    assert not out.exists()


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("allow", [False, True])
def test_pickled_checkpoint_is_not_unpickled(tmp_path, capsys, allow):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, f)
    out = tmp_path / "out"
    argv = ["--convert-unet", "--model-version", str(path), "-o", str(out)] + (["--allow-pickle"] if allow else [])
    code, err = _cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert ("--allow-pickle" in err) != allow  # without it: says how; with it, torch's weights-only load refuses
    assert not marker.exists()
    assert not out.exists()


def test_ckpt_with_allow_pickle_loads_tensors(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    from python_coreml_sd.model_sources import resolve
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_checkpoint)), "global_step": 1}, path)
    with pytest.raises(UserError, match="--allow-pickle"):
        resolve(str(path))
    source = resolve(str(path), allow_pickle=True)
    assert json.loads((source.root / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
