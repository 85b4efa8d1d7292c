"""Each converted component loads back with coremltools and has the documented interface."""
import coremltools as ct

FLOAT32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
FLOAT16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16  # inputs of fp16 packages, as Apple's


def interface(path):
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    describe = lambda features: {f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType)
                                 for f in features}
    return describe(spec.description.input), describe(spec.description.output), spec.description.metadata


def package(packages, component, model="tiny"):
    from python_coreml_sd.convert.common import package_name
    return packages[package_name(model, component)]


def test_tiny_text_encoder_interface(tiny_fp16_packages):
    inputs, outputs, meta = interface(package(tiny_fp16_packages, "text_encoder"))
    assert inputs == {"input_ids": ((1, 77), FLOAT32)}
    assert outputs == {"last_hidden_state": ((1, 77, 32), FLOAT32), "pooled_outputs": ((1, 32), FLOAT32)}
    assert meta.userDefined["com.python_coreml_sd.component"] == "text_encoder"
    assert meta.userDefined["com.python_coreml_sd.source_model"] == "tiny"
    assert "OpenRAIL" in meta.license and meta.shortDescription


def test_tiny_vae_decoder_interface(tiny_fp16_packages):
    inputs, outputs, _ = interface(package(tiny_fp16_packages, "vae_decoder"))
    assert inputs == {"z": ((1, 4, 16, 16), FLOAT16)}
    assert outputs == {"image": ((1, 3, 128, 128), FLOAT32)}


def test_tiny_vae_encoder_interface(tiny_fp16_packages):
    inputs, outputs, _ = interface(package(tiny_fp16_packages, "vae_encoder"))
    assert inputs == {"x": ((1, 3, 128, 128), FLOAT16)}
    assert outputs == {"latent": ((1, 8, 16, 16), FLOAT32)}  # mean and log-variance


def test_tiny_safety_checker_interface(tiny_fp16_packages):
    inputs, outputs, _ = interface(package(tiny_fp16_packages, "safety_checker"))
    assert inputs == {"clip_input": ((1, 3, 32, 32), FLOAT16), "images": ((1, 128, 128, 3), FLOAT16),
                      "adjustment": ((1,), FLOAT16)}
    assert outputs == {"filtered_images": ((1, 128, 128, 3), FLOAT32), "has_nsfw_concepts": ((1, 1, 1, 1), FLOAT32),
                       "concept_scores": ((1, 17), FLOAT32)}


def program_dtypes(path):
    """Dtypes in the package's MIL program: of its tensor weights (non-scalar float consts), of the
    conv/linear weights and biases, of the compute ops' outputs, and its casts as (from, to)."""
    from coremltools.converters.mil.mil import types

    from python_coreml_sd.package_io import mil_program
    name = types.builtin_to_string
    ops = list(mil_program(ct.models.MLModel(str(path), skip_model_load=True)).functions["main"].operations)
    weights = {name(op.outputs[0].dtype) for op in ops if op.op_type == "const"
               and types.is_float(op.outputs[0].dtype) and op.outputs[0].rank > 0}
    layer_weights = {name(op.inputs[key].dtype) for op in ops if op.op_type in ("conv", "linear")
                     for key in ("weight", "bias") if key in op.inputs}
    compute = {name(out.dtype) for op in ops if op.op_type not in ("const", "cast") for out in op.outputs}
    casts = sorted((name(op.x.dtype), name(op.outputs[0].dtype)) for op in ops if op.op_type == "cast")
    return weights, layer_weights, compute, casts


def test_fp16_weights_by_default(tiny_fp16_packages):
    path = package(tiny_fp16_packages, "vae_decoder")
    weights, layer_weights, compute, casts = program_dtypes(path)
    assert weights == layer_weights == compute == {"fp16"}
    assert casts == [("fp16", "fp32")]  # only at the fp32 output (image); z comes in as fp16
    meta = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description.metadata
    assert meta.userDefined["com.python_coreml_sd.compute_precision"] == "float16"


def test_sd2_like_model_converts_with_its_own_shapes(sd2_fp16_packages, sd2_source):
    model = sd2_source.name  # the whole --model-version, as Apple names packages
    inputs, outputs, _ = interface(package(sd2_fp16_packages, "text_encoder", model))
    assert outputs["last_hidden_state"] == ((1, 77, 1024), FLOAT32)
    inputs, outputs, _ = interface(package(sd2_fp16_packages, "vae_decoder", model))
    assert inputs == {"z": ((1, 4, 12, 12), FLOAT16)} and outputs == {"image": ((1, 3, 96, 96), FLOAT32)}
    inputs, outputs, _ = interface(package(sd2_fp16_packages, "vae_encoder", model))
    assert inputs == {"x": ((1, 3, 96, 96), FLOAT16)} and outputs == {"latent": ((1, 8, 12, 12), FLOAT32)}


def test_shape_flags_and_fp32_precision(tmp_path, tiny_source):
    from python_coreml_sd.convert import ConversionOptions
    from python_coreml_sd.convert import convert
    options = ConversionOptions("tiny", tmp_path, latent_h=8, latent_w=12, text_token_sequence_length=16,
                                compute_precision="float32", min_deployment_target="iOS17")
    paths = {p.name: p for p in convert(options, ["text_encoder", "vae_decoder"])}
    inputs, _, meta = interface(package(paths, "vae_decoder"))
    assert inputs == {"z": ((1, 4, 8, 12), FLOAT32)}
    assert meta.userDefined["com.python_coreml_sd.compute_precision"] == "float32"
    weights, layer_weights, compute, casts = program_dtypes(package(paths, "vae_decoder"))
    assert weights == layer_weights == compute == {"fp32"} and casts == []
    inputs, outputs, _ = interface(package(paths, "text_encoder"))
    assert inputs == {"input_ids": ((1, 16), FLOAT32)}
    assert ct.models.MLModel(str(package(paths, "text_encoder")), skip_model_load=True).get_spec().specificationVersion >= 8
