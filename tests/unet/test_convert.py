"""convert_unet for each attention implementation: package interface, metadata, batch one, skipping, and
the fp16 program's agreement (in the MIL runtime) with the diffusers UNet in fp32."""
import coremltools as ct
import numpy as np
import pytest

from python_coreml_sd.convert import ConversionOptions
from python_coreml_sd.convert.unet import convert_unet, diffusers_reference, sample_inputs
from python_coreml_sd.layers import ATTENTION_IMPLEMENTATIONS
from python_coreml_sd.metrics import psnr
from python_coreml_sd.runtime.mil import MILModel

FLOAT32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
FLOAT16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16


def _convert(source, out_dir, **options):
    out_dir.mkdir(parents=True, exist_ok=True)
    options = ConversionOptions(source.name, out_dir, **options)
    return options, convert_unet(source, options)


@pytest.fixture(scope="module", params=ATTENTION_IMPLEMENTATIONS)
def tiny_package(request, sources, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(f"unet_{request.param}")
    options, paths = _convert(sources["tiny"], out_dir, attention_implementation=request.param)
    return options, paths


@pytest.fixture(scope="module")
def sd2_package(sources, tmp_path_factory):
    return _convert(sources["sd2_like"], tmp_path_factory.mktemp("unet_sd2"), attention_implementation="SPLIT_EINSUM_V2")


def features(package):
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()

    def describe(items):
        return {f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType, f.shortDescription)
                for f in items}
    return describe(spec.description.input), describe(spec.description.output)


def test_interface_names_shapes_dtypes_and_descriptions(tiny_package, unets):
    options, paths = tiny_package
    assert [p.name for p in paths] == ["Stable_Diffusion_version_tiny_unet.mlpackage"]
    inputs, outputs = features(paths[0])
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"]
    # FLOAT16 inputs, as Apple's fp16 UNets declare them (docs/compat.md); the output stays FLOAT32
    assert inputs["sample"][:2] == ((2, 4, 16, 16), FLOAT16)
    assert inputs["timestep"][:2] == ((2,), FLOAT16)
    assert inputs["encoder_hidden_states"][:2] == ((2, 32, 1, 77), FLOAT16)
    assert outputs["noise_pred"][:2] == ((2, 4, 16, 16), FLOAT32)
    assert all(description for _, _, description in [*inputs.values(), *outputs.values()])


def test_metadata(tiny_package):
    options, paths = tiny_package
    meta = ct.models.MLModel(str(paths[0]), skip_model_load=True).user_defined_metadata
    assert meta["com.python_coreml_sd.component"] == "unet"
    assert meta["com.python_coreml_sd.attention_implementation"] == options.attention_implementation
    assert meta["com.python_coreml_sd.batch_size"] == "2"
    assert meta["com.python_coreml_sd.latent_size"] == "16x16"
    assert meta["com.python_coreml_sd.compute_precision"] == "float16"


def test_weights_are_stored_in_fp16(tiny_package, unets):
    _, paths = tiny_package
    weight_bin = next(paths[0].rglob("weight.bin"))
    parameters = sum(p.numel() for p in unets["tiny"].parameters())
    assert 2 * parameters <= weight_bin.stat().st_size < 2.2 * parameters


def test_existing_output_is_skipped(tiny_package, sources):
    options, paths = tiny_package
    before = paths[0].stat().st_mtime_ns
    assert convert_unet(sources["tiny"], options) == paths
    assert paths[0].stat().st_mtime_ns == before


def test_sd2_like_converts_with_its_context_width(sd2_package):
    _, paths = sd2_package
    inputs, outputs = features(paths[0])
    assert inputs["encoder_hidden_states"][0] == (2, 48, 1, 77)
    assert outputs["noise_pred"][0] == (2, 4, 16, 16)


def test_batch_one_and_latent_size(sources, tmp_path, capsys):
    # --check-output-correctness runs the fp16 program (MIL runtime) against the diffusers UNet too
    _, paths = _convert(sources["tiny"], tmp_path, attention_implementation="ORIGINAL", unet_batch_one=True,
                        latent_h=8, latent_w=24, text_token_sequence_length=5,
                        check_output_correctness=True, psnr_threshold=40.0)
    assert "noise_pred PSNR" in capsys.readouterr().out
    inputs, outputs = features(paths[0])
    assert inputs["sample"][0] == (1, 4, 8, 24)
    assert inputs["timestep"][0] == (1,)
    assert inputs["encoder_hidden_states"][0] == (1, 32, 1, 5)
    assert outputs["noise_pred"][0] == (1, 4, 8, 24)


def test_weights_halved_as_they_load_equal_weights_halved_after_the_load(sources):
    """ModelSource.load_unet(halve_if_large) halves each weight as it is read (the fp32 weights never exist
    all at once); the result is bit for bit what halving the fp32 UNet's weights afterwards gives."""
    import torch

    from python_coreml_sd.convert.unet import halve_if_large, halve_large_weights

    streamed = sources["tiny"].load_unet(halve_if_large).state_dict()
    after = dict(sources["tiny"].load_unet().state_dict())
    halve_large_weights(after)
    assert streamed.keys() == after.keys()
    assert {v.dtype for v in streamed.values()} == {torch.float16, torch.float32}
    for name, value in after.items():
        assert streamed[name].dtype == value.dtype and torch.equal(streamed[name], value), name


@pytest.mark.parametrize("precision, check, expected", [
    ("float16", False, "halve_if_large"), ("float16", True, None), ("float32", False, None)])
def test_the_loader_halves_weights_only_for_fp16_packages_without_a_reference(precision, check, expected):
    """The reference of --check-output-correctness runs the diffusers UNet in fp32, so its loader gets no
    `convert`; neither does an fp32 package's."""
    from python_coreml_sd import registry
    from python_coreml_sd.convert.unet import build_mlprogram

    class Loaded(Exception):
        pass

    def loader(convert):
        raise Loaded(getattr(convert, "__name__", convert))

    config = registry.family("tiny")["architecture"]["unet"]
    options = ConversionOptions("tiny", "/unused", compute_precision=precision, check_output_correctness=check)
    with pytest.raises(Loaded) as info:
        build_mlprogram(loader, sample_inputs(config, 2, 16, 16, 77), options, config)
    assert info.value.args[0] == expected


def run_against_diffusers(package, unet) -> float:
    config = dict(unet.config)
    inputs = sample_inputs(config, 2, 16, 16, 77)
    reference = diffusers_reference(unet, inputs)
    result = MILModel(str(package)).predict({k: v.numpy() for k, v in inputs.items()})
    assert result["noise_pred"].shape == reference.shape
    return psnr(reference, result["noise_pred"])


def test_fp16_program_agrees_with_diffusers_fp32(tiny_package, unets):
    _, paths = tiny_package
    assert run_against_diffusers(paths[0], unets["tiny"]) >= 40


def test_sd2_like_fp16_program_agrees_with_diffusers_fp32(sd2_package, unets):
    _, paths = sd2_package
    assert run_against_diffusers(paths[0], unets["sd2_like"]) >= 40


@pytest.mark.parametrize("values", [
    [1.0, -2.0], [70000.0], [-70000.0, 1.0], [-1e39, 3.0], [float("nan"), 1.0], [float("inf"), -7e4],
    [float("-inf"), 5e37], [float("nan"), 1e5], 5.0,
])
def test_fast_fp16_overflow_check_agrees_with_coremltools(values):
    """Our fp16 cast pass replaces coremltools' overflow check (slow on large weights) with an equivalent."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    from python_coreml_sd.convert.unet import STREAMING_FP16_PASS, _register_streaming_fp16_pass

    _register_streaming_fp16_pass()
    const = np.array(values, dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=const.shape or (1,))])
    def prog(x):
        return mb.add(x=x, y=const)

    add = next(op for op in prog.functions["main"].operations if op.op_type == "add")
    ours = type(PASS_REGISTRY[STREAMING_FP16_PASS]).fp16_overflow(add)
    assert ours == add_fp16_cast.fp16_overflow(add)
