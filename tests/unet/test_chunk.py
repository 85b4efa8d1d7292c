"""--chunk-unet: two packages cut from the converted program's MIL graph, balanced by weight size, whose
inputs and outputs chain; run one after the other they give the unchunked program's output."""
import coremltools as ct
import numpy as np
import pytest

from python_coreml_sd.convert import ConversionOptions
from python_coreml_sd.convert.unet import convert_unet, sample_inputs
from python_coreml_sd.metrics import psnr
from python_coreml_sd.runtime.mil import MILModel


@pytest.fixture(scope="module")
def chunked(sources, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("unet_chunked")
    options = ConversionOptions("tiny", out_dir, attention_implementation="SPLIT_EINSUM", chunk_unet=True)
    return convert_unet(sources["tiny"], options)


def interface(package):
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    return ({f.name: tuple(f.type.multiArrayType.shape) for f in spec.description.input},
            {f.name: tuple(f.type.multiArrayType.shape) for f in spec.description.output})


def weight_bytes(package):
    return next(package.rglob("weight.bin")).stat().st_size


def test_names(chunked):
    assert [p.name for p in chunked] == ["Stable_Diffusion_version_tiny_unet.mlpackage",
                                         "Stable_Diffusion_version_tiny_unet_chunk1.mlpackage",
                                         "Stable_Diffusion_version_tiny_unet_chunk2.mlpackage"]
    assert all(p.is_dir() for p in chunked)


def test_weights_are_balanced_and_complete(chunked):
    full, first, second = map(weight_bytes, chunked)
    assert 0.4 <= first / (first + second) <= 0.6
    # each weight lands in exactly one chunk (64-byte alignment per blob adds a little)
    assert full * 0.98 <= first + second <= full * 1.05


def test_inputs_and_outputs_chain(chunked):
    full, first, second = map(interface, chunked)
    assert set(first[0]) <= set(full[0])  # chunk 1 takes only original inputs
    assert list(second[1]) == ["noise_pred"] and second[1]["noise_pred"] == full[1]["noise_pred"]
    crossing = set(second[0]) - set(full[0])
    assert crossing and crossing == set(first[1])
    assert all(second[0][name] == first[1][name] for name in crossing)
    # original inputs chunk 2 still needs keep their name and shape (the text embeddings feed attention)
    assert all(second[0][name] == full[0][name] for name in set(second[0]) & set(full[0]))


def test_chunk_metadata(chunked):
    for index, package in enumerate(chunked[1:], 1):
        meta = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
        assert meta["com.python_coreml_sd.component"] == f"unet_chunk{index}"
        assert meta["com.python_coreml_sd.attention_implementation"] == "SPLIT_EINSUM"


def test_chunk1_then_chunk2_equals_unchunked(chunked, unets):
    inputs = {k: v.numpy() for k, v in sample_inputs(dict(unets["tiny"].config), 2, 16, 16, 77).items()}
    expected = MILModel(str(chunked[0])).predict(inputs)["noise_pred"]
    intermediate = MILModel(str(chunked[1])).predict(inputs)
    second = MILModel(str(chunked[2]))
    second_inputs = {**{k: v for k, v in inputs.items()}, **intermediate}
    names = set(interface(chunked[2])[0])
    output = second.predict({k: v for k, v in second_inputs.items() if k in names})["noise_pred"]
    # fp16 rounding apart: the MIL runtime's 1x1 convolutions give channels-last tensors, which the whole passes on
    # where chunk 2 receives NCHW arrays; so the same ops round differently (0.002 at most seen)
    np.testing.assert_allclose(output, expected, rtol=0, atol=4e-3)
    assert psnr(expected, output) >= 60
