"""One clear UserError for every bad input: unknown op, wrong input name/shape/dtype, a file that
is not an ML Program, an unavailable backend or device."""
import platform

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from mil_test_utils import run_mil
from python_coreml_sd.errors import UserError
from python_coreml_sd.runtime import load_model
from python_coreml_sd.runtime.mil import MILModel, UnsupportedOpError, supported_ops


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A two-input program: x fp32 (2, 3), n int32 (3,)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Function, Placeholder, Program, types

    inputs = {"x": Placeholder((2, 3), dtype=types.fp32), "n": Placeholder((3,), dtype=types.int32)}
    with Function(inputs, opset_version=ct.target.iOS16) as func:
        y = mb.add(x=func.inputs["x"], y=mb.cast(x=func.inputs["n"], dtype="fp32"), name="y")
        func.set_outputs([y])
    prog = Program()
    prog.add_function("main", func)
    path = tmp_path_factory.mktemp("pkg") / "two_inputs.mlpackage"
    ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
               minimum_deployment_target=ct.target.iOS16).save(str(path))
    return path


def good_inputs():
    return {"x": np.ones((2, 3), np.float32), "n": np.arange(3, dtype=np.int32)}


def test_good_inputs_run(package):
    out = MILModel(package).predict(good_inputs())
    np.testing.assert_array_equal(out["y"], np.ones((2, 3)) + np.arange(3))


def test_unknown_op_names_the_op_and_its_type(tmp_path):
    x = np.ones((1, 5, 4), np.float32)
    assert "non_maximum_suppression" not in supported_ops()  # object detection: out of scope
    with pytest.raises(UnsupportedOpError, match=r"op '.*' of type 'non_maximum_suppression' is not supported") as info:
        run_mil(lambda x: mb.non_maximum_suppression(boxes=x, scores=mb.slice_by_size(x=x, begin=[0, 0, 0], size=[1, 5, 2]),
                                                     iou_threshold=0.5, max_boxes=2), {"x": x}, tmp_path)
    assert isinstance(info.value, UserError)
    assert ".mlpackage" in str(info.value)


def test_missing_input_names_it_with_shape_and_dtype(package):
    inputs = good_inputs()
    del inputs["n"]
    with pytest.raises(UserError, match=r"missing input 'n' \(shape \(3,\), dtype int32\)"):
        MILModel(package).predict(inputs)


def test_unknown_input_name(package):
    with pytest.raises(UserError, match=r"unknown input\(s\) \['z'\]; the model takes x \(2, 3\) float32, n \(3,\) int32"):
        MILModel(package).predict({**good_inputs(), "z": np.zeros(1)})


def test_wrong_shape_names_input_and_expected_shape(package):
    with pytest.raises(UserError, match=r"input 'x' has shape \(3, 2\); expected \(2, 3\) \(float32\)"):
        MILModel(package).predict({**good_inputs(), "x": np.ones((3, 2), np.float32)})


@pytest.mark.parametrize("name,value", [
    ("n", np.ones(3, np.float32)),         # fractional values into an int32 input
    ("x", np.ones((2, 3), np.complex64)),  # no real dtype
    ("x", np.full((2, 3), "a")),
])
def test_wrong_dtype_names_input_and_expected_dtype(package, name, value):
    with pytest.raises(UserError, match=rf"input '{name}' has dtype .*; expected (int32|float32) \(shape"):
        MILModel(package).predict({**good_inputs(), name: value})


def test_predict_needs_a_dict(package):
    with pytest.raises(UserError, match="dict"):
        MILModel(package).predict([np.ones((2, 3))])


def test_neural_network_model_is_refused_naming_the_file(tmp_path):
    import coremltools as ct
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(3))])
    builder.add_activation("relu", "RELU", "x", "y")
    path = tmp_path / "old_style.mlmodel"
    ct.models.utils.save_spec(builder.spec, str(path))
    with pytest.raises(UserError, match=r"old_style\.mlmodel: holds a Core ML 'neuralNetwork' model, not an ML Program"):
        MILModel(path)


def test_garbage_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "garbage.mlmodel"
    path.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(UserError, match=r"garbage\.mlmodel: not a Core ML model"):
        MILModel(path)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"nothere\.mlpackage: no such model"):
        MILModel(tmp_path / "nothere.mlpackage")


def test_load_model_mil_backend(package):
    model = load_model(package, backend="mil")
    assert isinstance(model, MILModel)
    assert set(model.output_description) == {"y"}


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML is available on macOS")
def test_coreml_backend_off_macos_suggests_mil(package):
    with pytest.raises(UserError, match="backend 'coreml' needs macOS.*use backend 'mil'"):
        load_model(package, backend="coreml")


def test_unknown_backend(package):
    with pytest.raises(UserError, match="unknown backend 'onnx'"):
        load_model(package, backend="onnx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu(package):
    with pytest.raises(UserError, match="no CUDA GPU"):
        MILModel(package, device="cuda")
