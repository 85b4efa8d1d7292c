"""Mixed-bit: sensitivity analysis, recipe choice, name mapping to MIL consts, applying a recipe."""
import json
import sys

import numpy as np
import pytest

from python_coreml_sd.compression import plot, recipes, search, testbed
from python_coreml_sd.compression.palettize import lut_weights
from python_coreml_sd.package_io import mil_program
from python_coreml_sd.errors import UserError

import coremltools as ct  # noqa: E402  (a missing coremltools is a failure, not a skip)


@pytest.fixture(scope="module")
def net():
    return testbed.small_net()


@pytest.fixture(scope="module")
def source(tmp_path_factory, net):
    module, inputs = net
    return testbed.convert(module, inputs, tmp_path_factory.mktemp("src") / "small.mlpackage")


@pytest.fixture(scope="module")
def analysis(net):
    module, inputs = net
    return search.layer_sensitivity(module, inputs, log=None)


def test_sensitivity_covers_large_layers_and_grows_with_bits(analysis):
    assert set(analysis["layers"]) == {"conv1", "conv2", "fc"}  # "thin" (512 weights) stays fp16
    for layer in analysis["layers"].values():
        scores = [layer["psnr"][b] for b in (1, 2, 4, 6, 8)]
        assert scores == sorted(scores)


def test_recipe_hits_target_bits(analysis):
    for target in (8, 6, 4, 3, 2):
        recipe = search.choose_recipe(analysis, target_bits=target)
        assert search.average_bits(analysis, recipe) <= target
    assert set(search.choose_recipe(analysis, target_bits=16).values()) == {16}


def test_recipe_for_target_psnr(net, analysis):
    module, inputs = net
    recipe = search.choose_recipe(analysis, target_psnr=30)
    assert search.predicted_psnr(analysis, recipe) >= 30
    assert search.average_bits(analysis, recipe) < 16
    # The additive-noise prediction is an estimate; the real figure lands close to it.
    assert abs(search.measure_recipe(module, inputs, recipe) - search.predicted_psnr(analysis, recipe)) < 3


def test_measure_recipe_restores_weights(net):
    module, inputs = net
    before = {n: p.clone() for n, p in module.named_parameters()}
    search.measure_recipe(module, inputs, {"conv2": 1, "fc": 2})
    for n, p in module.named_parameters():
        assert (p == before[n]).all()


def test_name_mapping():
    layers = {"down_blocks.0.resnets.0.conv1": 4, "resnets.0.conv1": 2}
    # Wrapper prefixes and cast suffixes are ignored; the longest (most specific) key wins.
    assert recipes._match("unet_down_blocks_0_resnets_0_conv1_weight_to_fp16", layers) == "down_blocks.0.resnets.0.conv1"
    assert recipes._match("up_blocks_1_resnets_0_conv1_weight_to_fp16", layers) == "resnets.0.conv1"
    assert recipes._match("down_blocks_0_resnets_0_conv1_bias_to_fp16", layers) is None
    assert recipes._match("xconv1_weight", {"conv1": 1}) is None  # only whole path components match


def test_apply_recipe(source, tmp_path):
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps({"layers": {"conv2": 4, "fc": 2, "conv1": 16}}))
    dst = search.apply_recipe(source, tmp_path / "mixed.mlpackage", recipe_file)
    model = ct.models.MLModel(str(dst), skip_model_load=True)
    luts = {op.name: op.lut.val.shape[-2] for f in mil_program(model).functions.values()
            for op in f.operations if op.op_type == "constexpr_lut_to_dense"}
    assert luts == {"conv2_weight_to_fp16_palettized": 16, "fc_weight_to_fp16_palettized": 4}
    assert len(np.unique(lut_weights(model)["fc_weight_to_fp16"])) <= 4


def test_recipe_errors(source, tmp_path):
    with pytest.raises(UserError, match="not in the model"):
        search.apply_recipe(source, tmp_path / "x.mlpackage", {"no_such_layer": 4})
    with pytest.raises(UserError, match="unsupported bits"):
        search.apply_recipe(source, tmp_path / "x.mlpackage", {"conv2": "four"})
    with pytest.raises(UserError, match="JSON object"):
        search.apply_recipe(source, tmp_path / "x.mlpackage", ["conv2", 4])
    assert not (tmp_path / "x.mlpackage").exists()


def test_recipe_names_are_canonical():
    # Recipes of the wrapped module (the analysis used to write "unet." names) load under the UNet's own.
    assert recipes.recipe_layers({"layers": {"unet.conv_in": 4, "conv_out": 16}}) == {"conv_in": 4, "conv_out": 16}
    with pytest.raises(UserError, match="two bit widths"):
        recipes.recipe_layers({"unet.conv_in": 4, "conv_in": 2})
    for bits in (0, 5, 7, 32, 4.5, True, None):
        with pytest.raises(UserError, match="unsupported bits"):
            recipes.recipe_layers({"conv_in": bits})
    every_width = {f"layer{b}": b for b in (1, 2, 3, 4, 6, 8, 16)}
    assert recipes.recipe_layers(every_width) == every_width


def test_names_match_the_converters_weights_and_a_wrappers():
    layers = {"down_blocks.0.resnets.0.conv1": 4}
    consts = ["down_blocks_0_resnets_0_conv1_weight_to_fp16",  # torch2coreml: the UNet's own paths
              "down_blocks_0_resnets_0_conv1_bias_to_fp16", "up_blocks_0_resnets_0_conv1_weight_to_fp16"]
    assert recipes.match_consts(consts, layers) == {consts[0]: 4}
    assert recipes.match_consts(["unet_down_blocks_0_resnets_0_conv1_weight_to_fp16"], layers)  # testbed's wrapper
    with pytest.raises(UserError, match="not in the model"):
        recipes.match_consts(consts[1:], layers)


def test_plot_writes_png(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the Pillow drawing, whether or not matplotlib is here
    curve = [{"megabytes": m, "measured_psnr": p} for m, p in ((1.0, 50), (0.6, 40), (0.3, 25))]
    uniform = [{"megabytes": m, "measured_psnr": p} for m, p in ((0.75, 52), (0.5, 38), (0.25, 20))]
    path = plot.plot(curve, uniform, tmp_path / "plot.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (720, 460)
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) >= 4  # not blank: axes, text, series
    # each point is a dot of its series' colour where the data puts it (plot frame: 60 px margins,
    # x from the smallest to the largest size, y from the lowest PSNR - 2 dB to the highest + 2 dB)
    x0, x1, y0, y1 = 0.25, 1.0, 20 - 2, 52 + 2
    for series, colour in ((curve, (0, 0, 255)), (uniform, (255, 0, 0))):
        for p in series:
            x = round(60 + (p["megabytes"] - x0) / (x1 - x0) * (720 - 120))
            y = round(460 - 60 - (p["measured_psnr"] - y0) / (y1 - y0) * (460 - 120))
            assert (pixels[y - 1:y + 2, x - 1:x + 2] == colour).all(axis=-1).any(), (p, colour)
    assert (pixels[100:130, 100:130] == 255).all()  # and white where there is no data
