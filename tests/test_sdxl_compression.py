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

SIX_BIT_PSNR = 25  # as the SD 6-bit test's --psnr-threshold (tests/test_quantize_flags.py)


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
