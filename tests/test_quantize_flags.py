"""--quantize-nbits / --mixed-bit-recipe in the converter: LUT weights in the saved packages."""
import json

import coremltools as ct
import numpy as np
import pytest

import python_coreml_sd.convert as conversion
from python_coreml_sd import torch2coreml
from python_coreml_sd.compression.palettize import SUPPORTED_NBITS, WEIGHT_THRESHOLD, lut_weights
from python_coreml_sd.package_io import mil_program
from python_coreml_sd.errors import UserError


def package_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load(path):
    return ct.models.MLModel(str(path), skip_model_load=True)


def lut_entries(model) -> dict:
    """{const name: entries of its look-up table} for every constexpr_lut_to_dense op, from the op's lut
    shape: (2^n,) in the iOS 16 layout, (..., 2^n, 1) in the iOS 18 one."""
    out = {}
    for function in mil_program(model).functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_lut_to_dense":
                lut = op.lut.val
                out[op.name.removesuffix("_palettized")] = lut.shape[0] if lut.ndim == 1 else lut.shape[-2]
    return out


def distinct_values(values) -> int:
    return len(np.unique(values.astype(np.float32)))  # (float32: numpy 2.3 np.unique miscounts large float16 arrays)


def large_float_consts(model) -> list:
    """Names of the dense float weights of more than WEIGHT_THRESHOLD values left in the program."""
    return [op.name for function in mil_program(model).functions.values() for op in function.operations
            if op.op_type == "const" and op.outputs[0].val is not None and np.size(op.outputs[0].val) > WEIGHT_THRESHOLD
            and np.asarray(op.outputs[0].val).dtype.kind == "f"]


@pytest.fixture(scope="module")
def six_bit(tmp_path_factory):
    out = tmp_path_factory.mktemp("q6")
    assert torch2coreml.main(["--convert-text-encoder", "--convert-unet", "--quantize-nbits", "6",
                              "--check-output-correctness", "--psnr-threshold", "25", "-o", str(out)]) == 0
    return out


def test_six_bit_packages_hold_lut_weights_and_shrink(six_bit, tiny_fp16_packages):
    for component in ("text_encoder", "unet"):
        name = f"Stable_Diffusion_version_tiny_{component}.mlpackage"
        model = load(six_bit / name)
        entries = lut_entries(model)
        assert entries and set(entries.values()) == {64}, component  # 2^6-entry tables, every one
        assert large_float_consts(model) == [], component  # every large weight is palettized
        luts = lut_weights(model)
        assert set(luts) == set(entries)
        assert all(distinct_values(values) <= 64 for values in luts.values())
        largest = max(luts.values(), key=np.size)
        assert distinct_values(largest) > 32  # really 6 bits' worth of values, not fewer
        assert model.user_defined_metadata["com.python_coreml_sd.quantize_nbits"] == "6"
        # fp16 -> 6 bits: large weights shrink to about 6/16 of their size.
        assert package_bytes(six_bit / name) < 0.55 * package_bytes(tiny_fp16_packages[name])


def test_three_bit_end_to_end_on_an_ios18_target(tmp_path, capsys):
    assert torch2coreml.main(["--convert-text-encoder", "--quantize-nbits", "3", "--min-deployment-target", "macOS15",
                              "--check-output-correctness", "--psnr-threshold", "20", "-o", str(tmp_path)]) == 0
    assert "last_hidden_state PSNR" in capsys.readouterr().out  # the 3-bit package ran in the MIL runtime
    model = load(tmp_path / "Stable_Diffusion_version_tiny_text_encoder.mlpackage")
    entries = lut_entries(model)
    assert entries and set(entries.values()) == {8}
    assert large_float_consts(model) == []
    luts = lut_weights(model)
    assert all(distinct_values(values) <= 8 for values in luts.values())
    assert distinct_values(max(luts.values(), key=np.size)) > 4
    assert model.user_defined_metadata["com.python_coreml_sd.quantize_nbits"] == "3"


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_quantize_nbits_takes_the_libraries_bit_widths(capsys, tmp_path, monkeypatch):
    assert 3 in SUPPORTED_NBITS
    for nbits in SUPPORTED_NBITS:
        args = torch2coreml.parser_spec().parse_args(["--convert-unet", "--quantize-nbits", str(nbits)])
        assert torch2coreml.options_from_args(args).quantize_nbits == nbits
    code, err = run_main(capsys, "--convert-unet", "--quantize-nbits", "5")
    assert code == 2 and "invalid choice: 5" in err
    # 3 bits on a target before iOS 18 fails before converting, in one line
    monkeypatch.setattr(conversion, "converter", lambda component: pytest.fail("conversion started"))
    code, err = run_main(capsys, "--convert-text-encoder", "--quantize-nbits", "3", "-o", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 0
    assert "--quantize-nbits 3 needs --min-deployment-target iOS18 or macOS15" in err
    assert not (tmp_path / "o").exists()


def test_library_refuses_three_bits_before_ios18(tiny_fp16_packages):
    from python_coreml_sd.compression.palettize import palettize_model
    model = load(tiny_fp16_packages["Stable_Diffusion_version_tiny_text_encoder.mlpackage"])  # macOS13
    with pytest.raises(UserError, match="3 bits needs the model converted for iOS 18"):
        palettize_model(model, 3)
    with pytest.raises(UserError, match="3 bits needs the model converted for iOS 18"):
        palettize_model(model, None, recipe={"text_encoder.embeddings.token_embedding": 3})


def test_mixed_bit_recipe_applies_to_the_unet_only(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"down_blocks.1.attentions.0.proj_in": 4, "down_blocks.0.resnets.0.conv1": 8}))
    assert torch2coreml.main(["--convert-unet", "--convert-vae-decoder", "--mixed-bit-recipe", str(recipe),
                              "-o", str(tmp_path)]) == 0
    unet = load(tmp_path / "Stable_Diffusion_version_tiny_unet.mlpackage")
    vae = load(tmp_path / "Stable_Diffusion_version_tiny_vae_decoder.mlpackage")
    proj_in, conv1 = "down_blocks_1_attentions_0_proj_in_weight_to_fp16", "down_blocks_0_resnets_0_conv1_weight_to_fp16"
    assert lut_entries(unet) == {proj_in: 16, conv1: 256}  # the recipe's layers at its bits, nothing else
    luts = lut_weights(unet)
    assert 8 < distinct_values(luts[proj_in]) <= 16 and 128 < distinct_values(luts[conv1]) <= 256
    assert large_float_consts(unet)  # unlisted layers stay fp16
    meta = unet.user_defined_metadata
    assert meta["com.python_coreml_sd.mixed_bit_recipe"] == "recipe.json"
    assert "com.python_coreml_sd.quantize_nbits" not in meta
    assert not lut_entries(vae) and not lut_weights(vae)
    assert "com.python_coreml_sd.mixed_bit_recipe" not in vae.user_defined_metadata


def test_bad_recipe_fails_before_converting(capsys, tmp_path):
    bad = tmp_path / "recipe.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--convert-unet", "--mixed-bit-recipe", str(bad), "-o", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "cannot read mixed-bit recipe" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
