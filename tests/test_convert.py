"""Each converted component loads back with coremltools and has the documented interface."""
import coremltools as ct

FLOAT32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def interface(path):
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    describe = lambda features: {f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType)
                                 for f in features}
    return describe(spec.description.input), describe(spec.description.output), spec.description.metadata


def package(packages, component, model="tiny"):
    return packages[f"Stable_Diffusion_version_{model}_{component}.mlpackage"]


def test_tiny_text_encoder_interface(tiny_fp16_packages):
    inputs, outputs, meta = interface(package(tiny_fp16_packages, "text_encoder"))
    assert inputs == {"input_ids": ((1, 77), FLOAT32)}
    assert outputs == {"last_hidden_state": ((1, 77, 32), FLOAT32), "pooled_outputs": ((1, 32), FLOAT32)}
    assert meta.userDefined["com.python_coreml_sd.component"] == "text_encoder"
    assert meta.userDefined["com.python_coreml_sd.source_model"] == "tiny"
    assert "OpenRAIL" in meta.license and meta.shortDescription


def test_tiny_vae_decoder_interface(tiny_fp16_packages):
    inputs, outputs, _ = interface(package(tiny_fp16_packages, "vae_decoder"))
    assert inputs == {"z": ((1, 4, 16, 16), FLOAT32)}
    assert outputs == {"image": ((1, 3, 128, 128), FLOAT32)}


def test_tiny_vae_encoder_interface(tiny_fp16_packages):
    inputs, outputs, _ = interface(package(tiny_fp16_packages, "vae_encoder"))
    assert inputs == {"sample": ((1, 3, 128, 128), FLOAT32), "diagonal_noise": ((1, 4, 16, 16), FLOAT32),
                      "noise": ((1, 4, 16, 16), FLOAT32), "sqrt_alphas_cumprod": ((1, 1), FLOAT32),
                      "sqrt_one_minus_alphas_cumprod": ((1, 1), FLOAT32)}
    assert outputs == {"latent_dist": ((1, 4, 16, 16), FLOAT32)}


def test_tiny_safety_checker_interface(tiny_fp16_packages):
    inputs, outputs, _ = interface(package(tiny_fp16_packages, "safety_checker"))
    assert inputs == {"clip_input": ((1, 3, 32, 32), FLOAT32), "images": ((1, 128, 128, 3), FLOAT32),
                      "adjustment": ((1,), FLOAT32)}
    assert outputs == {"filtered_images": ((1, 128, 128, 3), FLOAT32), "has_nsfw_concepts": ((1,), FLOAT32),
                       "concept_scores": ((1, 17), FLOAT32)}


def test_fp16_weights_by_default(tiny_fp16_packages):
    model = ct.models.MLModel(str(package(tiny_fp16_packages, "vae_decoder")), skip_model_load=True)
    spec = model.get_spec()
    text = str(spec.mlProgram)
    assert "fp16" in text.lower() or "FLOAT16" in text
    assert spec.description.metadata.userDefined["com.python_coreml_sd.compute_precision"] == "float16"


def test_sd2_like_model_converts_with_its_own_shapes(sd2_fp16_packages, sd2_source):
    model = sd2_source.name.rstrip("/").split("/")[-1]
    inputs, outputs, _ = interface(package(sd2_fp16_packages, "text_encoder", model))
    assert outputs["last_hidden_state"] == ((1, 77, 1024), FLOAT32)
    inputs, outputs, _ = interface(package(sd2_fp16_packages, "vae_decoder", model))
    assert inputs == {"z": ((1, 4, 12, 12), FLOAT32)} and outputs == {"image": ((1, 3, 96, 96), FLOAT32)}
    inputs, _, _ = interface(package(sd2_fp16_packages, "vae_encoder", model))
    assert inputs["sample"] == ((1, 3, 96, 96), FLOAT32)


def test_shape_flags_and_fp32_precision(tmp_path, tiny_source):
    from python_coreml_sd.convert.common import ConversionOptions
    from python_coreml_sd.torch2coreml import convert
    options = ConversionOptions("tiny", tmp_path, latent_h=8, latent_w=12, text_token_sequence_length=16,
                                compute_precision="float32", min_deployment_target="iOS17")
    paths = {p.name: p for p in convert(options, ["text_encoder", "vae_decoder"])}
    inputs, _, meta = interface(package(paths, "vae_decoder"))
    assert inputs == {"z": ((1, 4, 8, 12), FLOAT32)}
    assert meta.userDefined["com.python_coreml_sd.compute_precision"] == "float32"
    inputs, outputs, _ = interface(package(paths, "text_encoder"))
    assert inputs == {"input_ids": ((1, 16), FLOAT32)}
    assert ct.models.MLModel(str(package(paths, "text_encoder")), skip_model_load=True).get_spec().specificationVersion >= 8
