"""--quantize-nbits / --mixed-bit-recipe in the converter: LUT weights in the saved packages."""
import json

import coremltools as ct
import numpy as np
import pytest

from python_coreml_sd import torch2coreml
from python_coreml_sd.compression.palettize import lut_weights


def package_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def six_bit(tmp_path_factory):
    out = tmp_path_factory.mktemp("q6")
    assert torch2coreml.main(["--convert-text-encoder", "--convert-unet", "--quantize-nbits", "6",
                              "--check-output-correctness", "--psnr-threshold", "25", "-o", str(out)]) == 0
    return out


def test_six_bit_packages_hold_lut_weights_and_shrink(six_bit, tiny_fp16_packages):
    for component in ("text_encoder", "unet"):
        name = f"Stable_Diffusion_version_tiny_{component}.mlpackage"
        model = ct.models.MLModel(str(six_bit / name), skip_model_load=True)
        luts = lut_weights(model)
        assert luts, component
        # (float32: numpy 2.3 np.unique miscounts large float16 arrays)
        assert all(len(np.unique(values.astype(np.float32))) <= 64 for values in luts.values())
        assert model.user_defined_metadata["com.python_coreml_sd.quantize_nbits"] == "6"
        # fp16 -> 6 bits: large weights shrink to about 6/16 of their size.
        assert package_bytes(six_bit / name) < 0.55 * package_bytes(tiny_fp16_packages[name])


def test_mixed_bit_recipe_applies_to_the_unet_only(tmp_path):
    from python_coreml_sd.compression.mixed_bit import recipe_layers
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"down_blocks.1.attentions.0.proj_in": 4, "down_blocks.0.resnets.0.conv1": 8}))
    assert recipe_layers(json.loads(recipe.read_text()))
    assert torch2coreml.main(["--convert-unet", "--convert-vae-decoder", "--mixed-bit-recipe", str(recipe),
                              "-o", str(tmp_path)]) == 0
    unet = ct.models.MLModel(str(tmp_path / "Stable_Diffusion_version_tiny_unet.mlpackage"), skip_model_load=True)
    vae = ct.models.MLModel(str(tmp_path / "Stable_Diffusion_version_tiny_vae_decoder.mlpackage"), skip_model_load=True)
    luts = lut_weights(unet)
    assert len(luts) == 2 and all(len(np.unique(v.astype(np.float32))) <= 256 for v in luts.values())
    assert not lut_weights(vae)


def test_bad_recipe_fails_before_converting(capsys, tmp_path):
    bad = tmp_path / "recipe.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        torch2coreml.main(["--convert-unet", "--mixed-bit-recipe", str(bad), "-o", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "cannot read mixed-bit recipe" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
