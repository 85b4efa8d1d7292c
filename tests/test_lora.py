"""--lora: LoRA files (diffusers/PEFT and kohya formats, built here from `tiny`) merged before conversion
agree with diffusers' pipeline with the same LoRA fused; bad LoRAs are one line, exit 2, nothing written."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.convert.common import package_name
from python_coreml_sd.convert.options import LoraSpec
from python_coreml_sd.metrics import psnr
from tests import lora_fixtures
from tests.support import assert_one_line

SCALE = 0.7


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_source):
    folder = tmp_path_factory.mktemp("loras")
    pairs = lora_fixtures.lora_pairs(tiny_source)
    files = {"peft": folder / "style_peft.safetensors", "kohya": folder / "style_kohya.safetensors"}
    lora_fixtures.write_peft_lora(pairs, files["peft"])
    lora_fixtures.write_kohya_lora(pairs, files["kohya"])
    return files


@pytest.fixture(scope="module")
def fused_reference(tiny_source, lora_files):
    """diffusers' own pipeline with the LoRA loaded and fused (fp32)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_source.root), safety_checker=None)
    pipe.load_lora_weights(str(lora_files["peft"]))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()
    return pipe


@pytest.fixture(scope="module")
def lora_packages(tmp_path_factory, lora_files):
    out = tmp_path_factory.mktemp("lora_out")
    options = ConversionOptions("tiny", out, loras=(LoraSpec(lora_files["peft"], SCALE),))
    return {p.name: p for p in convert(options, ["text_encoder", "unet"])}


def _run(package, inputs):
    from python_coreml_sd.runtime import load_model
    return load_model(package, backend="mil").predict({k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()})


def test_kohya_and_peft_formats_merge_to_the_same_weights_as_diffusers(tiny_source, lora_files, fused_reference):
    from python_coreml_sd.model_edits import source_for
    base = tiny_source.load_unet().state_dict()
    for kind, path in lora_files.items():
        source = source_for(ConversionOptions("tiny", "unused", loras=(LoraSpec(path, SCALE),)))
        unet, text = source.load_unet().state_dict(), source.load_text_encoder().state_dict()
        for name, reference in ((("unet", unet), fused_reference.unet.state_dict()),
                                (("text_encoder", text), fused_reference.text_encoder.state_dict())):
            component, merged = name
            assert set(merged) == set(reference), (kind, component)
            worst = max(float((merged[k] - reference[k]).abs().max()) for k in reference)
            assert worst < 1e-6, (kind, component, worst)
        assert sum(not torch.equal(unet[k], base[k]) for k in base) == 56, kind  # every attention projection


def test_merged_packages_agree_with_diffusers_fused_pipeline_and_differ_without(
        tiny_source, lora_packages, fused_reference, tiny_fp16_packages):
    from python_coreml_sd.convert import text_encoder as te
    from python_coreml_sd.convert import unet as un

    unet_config = dict(tiny_source.config("unet"))
    inputs = un.sample_inputs(unet_config, 2, 16, 16, 77)
    reference = un.diffusers_reference(fused_reference.unet, inputs)
    merged = _run(lora_packages[package_name("tiny", "unet")], inputs)["noise_pred"]
    plain = _run(tiny_fp16_packages[package_name("tiny", "unet")], inputs)["noise_pred"]
    assert psnr(reference, merged) >= 40, psnr(reference, merged)
    assert psnr(reference, plain) < 30, psnr(reference, plain)

    ids = te.sample_inputs(fused_reference.text_encoder, 77)
    with torch.no_grad():
        expected = fused_reference.text_encoder(ids["input_ids"].to(torch.int64)).last_hidden_state.numpy()
    merged = _run(lora_packages[package_name("tiny", "text_encoder")], ids)["last_hidden_state"]
    plain = _run(tiny_fp16_packages[package_name("tiny", "text_encoder")], ids)["last_hidden_state"]
    assert psnr(expected, merged) >= 40, psnr(expected, merged)
    assert psnr(expected, plain) < 30, psnr(expected, plain)


def test_metadata_lists_each_lora_with_sha256_and_scale(lora_packages, lora_files):
    import coremltools as ct
    from python_coreml_sd.model_cache import sha256_file
    for package in lora_packages.values():
        meta = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
        assert json.loads(meta["com.python_coreml_sd.loras"]) == [
            {"file": "style_peft.safetensors", "sha256": sha256_file(lora_files["peft"]), "scale": SCALE}]
        assert json.loads(meta["com.python_coreml_sd.flags"])["loras"] == [[sha256_file(lora_files["peft"]), SCALE]]


def test_lora_spec_parses_scale():
    assert LoraSpec.parse("a/b.safetensors:0.5") == LoraSpec(Path("a/b.safetensors"), 0.5)
    assert LoraSpec.parse("b.safetensors") == LoraSpec(Path("b.safetensors"), 1.0)


def _cli(capsys, *argv):
    from python_coreml_sd import torch2coreml
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_lora_of_another_family_is_refused(tmp_path, capsys, sd2_source):
    path = tmp_path / "sd2_lora.safetensors"
    lora_fixtures.write_kohya_lora(lora_fixtures.lora_pairs(sd2_source, text=False), path)
    out = tmp_path / "out"
    code, err = _cli(capsys, "--convert-unet", "--lora", str(path), "-o", str(out))
    assert_one_line(code, err, "does not fit the unet", prog="torch2coreml")
    assert not out.exists()


def test_lora_rank_mismatch_is_refused(tmp_path, capsys, tiny_source):
    pairs = lora_fixtures.lora_pairs(tiny_source, text=False)
    name = next(iter(pairs["unet"]))
    down, up = pairs["unet"][name]
    pairs["unet"][name] = (down, torch.cat([up, up], dim=1))  # up of rank 8 for a down of rank 4
    path = tmp_path / "bad_rank.safetensors"
    lora_fixtures.write_peft_lora(pairs, path)
    out = tmp_path / "out"
    code, err = _cli(capsys, "--convert-unet", "--lora", str(path), "-o", str(out))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 0, err
    assert str(path) in err
    assert not out.exists()


def test_lora_matching_no_module_is_refused_with_the_count(tmp_path, capsys):
    from safetensors.torch import save_file
    path = tmp_path / "nothing.safetensors"
    save_file({"unet.no_such.block.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such.block.to_q.lora_B.weight": torch.zeros(32, 4)}, str(path))
    out = tmp_path / "out"
    code, err = _cli(capsys, "--convert-unet", "--lora", str(path), "-o", str(out))
    assert_one_line(code, err, "none of its 1 modules matches", prog="torch2coreml")
    assert not out.exists()


def test_sdxl_lora_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file
    path = tmp_path / "xl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4)}, str(path))
    code, err = _cli(capsys, "--convert-text-encoder", "--lora", str(path), "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "is for SDXL", "the model is SD 1.x / 2.x", prog="torch2coreml")


def test_truncated_lora_is_refused(tmp_path, capsys):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{")
    code, err = _cli(capsys, "--convert-unet", "--lora", str(path), "-o", str(tmp_path / "out"))
    assert_one_line(code, err, "not a valid safetensors file", prog="torch2coreml")
