"""The runtime on a CUDA GPU: fp16 ops run in fp16, fused and per-op plans agree, CUDA graph replay
equals eager execution, and converted models match PyTorch. Skipped without a GPU."""
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from mil_test_utils import convert, numpy_inputs, reference, run_mil
from python_coreml_sd.metrics import psnr
from python_coreml_sd.runtime.mil import MILModel
from test_mil_models import UNet, tiny_unet, unet_inputs, Decoder, tiny_vae

pytestmark = pytest.mark.cuda
NAMES = ["sample", "timestep", "encoder_hidden_states"]


def test_fp16_ops_are_computed_in_fp16_on_cuda(tmp_path):
    x = np.full((4,), 1.0, np.float16)
    run_mil(lambda x: mb.add(x=x, y=np.float16(2 ** -11)), {"x": x}, tmp_path)
    model = MILModel(next(tmp_path.glob("*.mlpackage")), device="cuda")
    assert all(t is None or t.dtype in (torch.float16, torch.int32, torch.bool) for t in model.plan.env_init)
    out = model.predict({"x": x})
    (value,) = out.values()
    assert value.dtype == np.float16
    np.testing.assert_array_equal(value, np.float16(1.0) + np.float16(2 ** -11))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_unet_on_cuda_matches_pytorch(precision, tmp_path):
    module, inputs = UNet(tiny_unet()), unet_inputs(32)
    path = convert(module, inputs, NAMES, tmp_path / "u.mlpackage", precision)
    ref = reference(module, inputs)[0]
    feed = numpy_inputs(NAMES, inputs)
    for fuse in (False, True):
        out = list(MILModel(path, device="cuda", fuse=fuse).predict(feed).values())[0]
        assert psnr(ref, out) >= (60 if precision == "fp32" else 40), (precision, fuse)


def test_cuda_graph_replay_equals_eager(tmp_path):
    module, inputs = UNet(tiny_unet()), unet_inputs(32)
    path = convert(module, inputs, NAMES, tmp_path / "u.mlpackage", "fp16")
    eager = MILModel(path, device="cuda")
    graph = MILModel(path, device="cuda", cuda_graph=True)
    for seed in range(3):  # replays must pick up new inputs
        feed = numpy_inputs(NAMES, inputs)
        feed["sample"] = np.random.default_rng(seed).normal(size=feed["sample"].shape).astype(np.float32)
        a = list(eager.predict(feed).values())[0]
        b = list(graph.predict(feed).values())[0]
        # same kernels on the same data; allow for a different cuDNN algorithm choice
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert graph._graph is not None


def test_vae_decoder_fp16_on_cuda(tmp_path):
    module, z = Decoder(tiny_vae()), (torch.randn(1, 4, 16, 16),)
    path = convert(module, z, ["z"], tmp_path / "d.mlpackage", "fp16")
    out = list(MILModel(path, device="cuda").predict({"z": z[0].numpy()}).values())[0]
    assert psnr(reference(module, z)[0], out) >= 35


def test_compiled_cuda_graph_equals_eager(tmp_path):
    module, inputs = UNet(tiny_unet()), unet_inputs(32)
    path = convert(module, inputs, NAMES, tmp_path / "u.mlpackage", "fp16")
    eager = MILModel(path, device="cuda")
    fast = MILModel(path, device="cuda", cuda_graph=True, torch_compile=True)
    feed = numpy_inputs(NAMES, inputs)
    a, b = (list(m.predict(feed).values())[0].astype(np.float32) for m in (eager, fast))
    assert fast._graph is not None and psnr(a, b) >= 50
    on_device = {n: torch.as_tensor(v).cuda().half() for n, v in feed.items()}
    c = list(fast.predict_tensors(on_device).values())[0]
    assert c.is_cuda and psnr(a, c.float().cpu().numpy()) >= 50
