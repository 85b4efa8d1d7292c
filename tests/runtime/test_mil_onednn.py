"""CPU plans run constant-weight convolutions and linears on weights laid out for oneDNN at load
(ops/onednn.py): the program's results up to fp32 rounding, packed only where the rule says, and never
in a plan torch.compile traces."""
import numpy as np
import pytest
import torch

from mil_test_utils import convert
from python_coreml_sd.runtime.mil import MILModel
from python_coreml_sd.runtime.mil.ops import onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this PyTorch build has no oneDNN (mkldnn) CPU kernels")


def _convnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1),  # input 4096 elements > weight 288: plain conv2d
        torch.nn.Conv2d(8, 64, 3, stride=8, padding=1),  # input 8192 > weight 4608: plain
        torch.nn.SiLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1),  # weight 36864 >= input 1024: packed
        torch.nn.Conv2d(64, 32, 1),  # 1x1: a packed GEMM
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 16),  # packed
    ).eval()


@pytest.fixture(scope="module")
def convnet_package(tmp_path_factory):
    module, x = _convnet(), torch.randn(1, 4, 32, 32)
    path = convert(module, (x,), ["x"], tmp_path_factory.mktemp("onednn") / "convnet.mlpackage", "fp32")
    with torch.no_grad():
        return path, x, module(x).numpy()


def _packed_constants(model):
    return [t for t in model.plan.env_init if isinstance(t, torch.Tensor) and t.is_mkldnn]


@pytest.mark.parametrize("fuse", [False, True])
def test_packed_weights_compute_the_program(convnet_package, fuse):
    path, x, want = convnet_package
    model = MILModel(path, fuse=fuse)
    assert sorted(tuple(t.shape) for t in _packed_constants(model)) == [(16, 512), (32, 64), (64, 64, 3, 3)]
    got = list(model.predict({"x": x.numpy()}).values())[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_no_packed_weights_for_torch_compile(convnet_package):
    assert _packed_constants(MILModel(convnet_package[0], torch_compile=True)) == []


def test_conv_packing_rule():
    assert onednn.conv_worth_packing((1280, 1280, 3, 3), (2, 1280, 16, 16))
    assert not onednn.conv_worth_packing((320, 960, 3, 3), (2, 960, 64, 64))


def test_palettized_weights_are_packed_and_not_kept_twice(convnet_package, tmp_path):
    """A palettized weight is decompressed at load, then packed: the model keeps the packed copy only
    (its indices and decompressed values are not held for later specializations)."""
    import coremltools as ct

    path, x, _ = convnet_package
    config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpPalettizerConfig(
        mode="uniform", nbits=4, weight_threshold=0))
    compressed = ct.optimize.coreml.palettize_weights(ct.models.MLModel(str(path), skip_model_load=True), config)
    compressed.save(str(tmp_path / "c.mlpackage"))
    ct.optimize.coreml.decompress_weights(compressed).save(str(tmp_path / "d.mlpackage"))
    model = MILModel(tmp_path / "c.mlpackage")
    assert "constexpr_lut_to_dense" in model.op_types and len(_packed_constants(model)) == 3
    read = {id(t) for t in model.plan.env_init if t is not None}
    assert model._shared_constants and all(id(t) in read for t in model._shared_constants.values())
    got = list(model.predict({"x": x.numpy()}).values())[0]
    want = _run_op_by_op(MILModel(tmp_path / "d.mlpackage", torch_compile=True).plan, x)  # F.conv2d / F.linear
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _run_op_by_op(plan, x):
    """A plan's steps run eagerly (a torch_compile model's plan: no packed weights), without compiling it."""
    env = list(plan.env_init)
    env[plan.input_slots["x"]] = x
    return plan.run(env)[0].numpy()
