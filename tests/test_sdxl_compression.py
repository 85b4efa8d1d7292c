"""Compression of SDXL's UNets (issue 16) on `tiny-xl` / `tiny-xl-refiner`: 6-bit palettized packages, their chunks
still palettized, run on the MIL runtime against diffusers in fp32; the mixed-bit pre-analysis on an SDXL UNet."""
import json

import coremltools as ct
import numpy as np
import pytest
import torch

from python_coreml_sd.compression.palettize import lut_weights
from python_coreml_sd.components import component_of
from python_coreml_sd.convert import ConversionOptions, convert
from python_coreml_sd.metrics import psnr
from python_coreml_sd.model_sources import resolve
from python_coreml_sd.runtime import load_model
from tests.test_quantize_flags import distinct_values, large_float_consts, lut_entries

# The SD 6-bit test asks 25 dB (tests/test_quantize_flags.py); tiny-xl's 6-bit UNets measure ~39 dB against
# fp32 (fp16 alone: ~45), so 33 keeps a margin and still catches a layer gone wrong.
SIX_BIT_PSNR = 33


def load(path):
    return ct.models.MLModel(str(path), skip_model_load=True)


def run(package, inputs: dict) -> dict:
    model = load_model(package, backend="mil")
    names = load(package).get_spec().description.input
    return model.predict({f.name: np.asarray(inputs[f.name], np.float32) for f in names})


def run_chunks(first, second, inputs: dict) -> np.ndarray:
    """Chunk 1 on the UNet's inputs, chunk 2 on those and chunk 1's outputs, as the pipelines chain them."""
    return run(second, {**inputs, **run(first, inputs)})["noise_pred"]


def reference_inputs(source, seed=3):
    from python_coreml_sd.convert.unet import sample_inputs, text_pooled_width
    config = dict(source.load_unet().config)
    size = config["sample_size"]
    inputs = sample_inputs(config, 1, size, size, 77, text_pooled_width(source))
    inputs["text_embeds"] = torch.randn(inputs["text_embeds"].shape, generator=torch.Generator().manual_seed(seed))
    return inputs


@pytest.fixture(scope="module")
def six_bit(tmp_path_factory):
    """tiny-xl's UNet and tiny-xl-refiner's, --quantize-nbits 6 --chunk-unet, batch one."""
    out = tmp_path_factory.mktemp("xl_q6")
    options = ConversionOptions(model_version="tiny-xl", refiner_version="tiny-xl-refiner", output_dir=out,
                                quantize_nbits=6, chunk_unet=True, unet_batch_one=True)
    return {component_of(p): p for p in convert(options, ["unet"])}


def test_six_bit_unets_and_their_chunks_are_palettized(six_bit):
    assert set(six_bit) == {"unet", "unet_chunk1", "unet_chunk2", "refiner", "refiner_chunk1", "refiner_chunk2"}
    for component, package in six_bit.items():
        model = load(package)
        entries = lut_entries(model)
        assert entries and set(entries.values()) == {64}, component  # 2^6-entry tables, every one
        assert large_float_consts(model) == [], component  # no large weight went back to fp16 in the cut
        luts = lut_weights(model)
        assert all(distinct_values(v) <= 64 for v in luts.values()), component
        assert distinct_values(max(luts.values(), key=np.size)) > 32, component
        assert model.user_defined_metadata["com.python_coreml_sd.quantize_nbits"] == "6", component
    for unet in ("unet", "refiner"):  # the chunks hold the whole package's palettized weights between them
        whole = lut_weights(load(six_bit[unet]))
        parts = {**lut_weights(load(six_bit[f"{unet}_chunk1"])), **lut_weights(load(six_bit[f"{unet}_chunk2"]))}
        assert set(parts) == set(whole), unet
        assert all(np.array_equal(parts[n], whole[n]) for n in whole), unet


@pytest.mark.parametrize("unet,model", [("unet", "tiny-xl"), ("refiner", "tiny-xl-refiner")])
def test_six_bit_unets_run_close_to_diffusers_fp32(six_bit, unet, model):
    from python_coreml_sd.convert.unet import diffusers_reference
    source = resolve(model)
    inputs = reference_inputs(source)
    reference = diffusers_reference(source.load_unet(), inputs)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    whole = run(six_bit[unet], arrays)["noise_pred"]
    chunked = run_chunks(six_bit[f"{unet}_chunk1"], six_bit[f"{unet}_chunk2"], arrays)
    assert psnr(reference, whole) >= SIX_BIT_PSNR, psnr(reference, whole)
    assert psnr(whole, chunked) >= 60  # the same palettized weights, cut in two


# The mixed-bit pre-analysis on an SDXL UNet: the added conditions come from the component table (the
# converter's sample inputs), the recipe names its layers canonically and torch2coreml applies it.

@pytest.fixture(scope="module")
def xl_recipe(tmp_path_factory):
    """A recipe from the mixed-bit CLI for tiny-xl (two candidate widths, to keep it short), and the
    torch2coreml packages it gives: --chunk-unet, batch one."""
    from python_coreml_sd import torch2coreml
    from python_coreml_sd.compression import mixed_bit
    folder = tmp_path_factory.mktemp("xl_recipe")
    recipe = folder / "r.json"
    assert mixed_bit.main(["--model-version", "tiny-xl", "--bits", "6,4", "--target-bits", "5",
                           "--out", str(recipe)]) == 0
    assert torch2coreml.main(["--model-version", "tiny-xl", "--convert-unet", "--chunk-unet", "--unet-batch-one",
                              "--mixed-bit-recipe", str(recipe), "-o", str(folder / "out")]) == 0
    return json.loads(recipe.read_text()), folder / "out"


def lut_bits(model) -> dict:
    return {name: int(np.log2(entries)) for name, entries in lut_entries(model).items()}


def recipe_bits(layers: dict) -> dict:
    """The recipe's layers as the converter names their MIL weights (tests/compression/test_mixed_bit_cli.py)."""
    return {name.replace(".", "_") + "_weight_to_fp16": bits for name, bits in layers.items() if bits != 16}


def test_xl_recipe_covers_the_added_conditions_and_mixes_bits(xl_recipe):
    from python_coreml_sd.compression.sensitivity import palettizable_layers
    doc, _ = xl_recipe
    unet = resolve("tiny-xl").load_unet()
    assert set(doc["layers"]) == set(palettizable_layers(unet))  # every layer, canonically named
    assert {"add_embedding.linear_1", "add_embedding.linear_2"} <= set(doc["layers"])  # SDXL's added embedding
    assert {6, 4} <= set(doc["layers"].values()) and 4.5 < doc["average_bits"] <= 5
    assert doc["model"] == "tiny-xl" and abs(doc["measured_psnr"] - doc["predicted_psnr"]) < 2


def test_xl_recipe_applies_to_the_converted_unet_and_its_chunks(xl_recipe):
    doc, out = xl_recipe
    name = "Stable_Diffusion_version_tiny-xl_unet"
    expected = recipe_bits(doc["layers"])
    assert lut_bits(load(out / f"{name}.mlpackage")) == expected  # each layer at the recipe's bits
    chunks = [lut_bits(load(out / f"{name}_chunk{i}.mlpackage")) for i in (1, 2)]
    assert chunks[0] and chunks[1] and {**chunks[0], **chunks[1]} == expected


def test_xl_recipe_output_psnr_is_as_predicted(xl_recipe):
    """The converted mixed-bit UNet on the MIL runtime vs diffusers fp32, on the analysis' own inputs (the
    converter's batch-one sample inputs): near what the pre-analysis predicted (fp16 activations add a little)."""
    from python_coreml_sd.convert.unet import diffusers_reference, sample_inputs, text_pooled_width
    doc, out = xl_recipe
    source = resolve("tiny-xl")
    unet = source.load_unet()
    size = unet.config.sample_size
    inputs = sample_inputs(dict(unet.config), 1, size, size, source.text_positions(), text_pooled_width(source))
    arrays = {k: v.numpy() for k, v in inputs.items()}
    reference = diffusers_reference(unet, inputs)
    measured = psnr(reference, run(out / "Stable_Diffusion_version_tiny-xl_unet.mlpackage", arrays)["noise_pred"])
    assert abs(measured - doc["predicted_psnr"]) < 2, (measured, doc["predicted_psnr"])
    # and the recipe really costs accuracy: the fp16-only error is far smaller (the SDXL fp16 test: >= 45 dB)
    assert measured < 42, measured


def test_bare_sdxl_unet_folder_is_refused_in_one_line(capsys, tmp_path):
    from python_coreml_sd.compression import mixed_bit
    with pytest.raises(SystemExit) as exit_info:
        mixed_bit.main(["--unet-dir", str(resolve("tiny-xl").root / "unet"), "--target-bits", "5",
                        "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and "is an SDXL UNet: give its model folder" in err
    assert not (tmp_path / "r.json").exists()
