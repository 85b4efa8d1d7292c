"""MILModel(torch_compile=True): the plan under torch.compile computes what the op-by-op plan computes,
falls back to op by op when compilation fails, and predict_tensors runs on device tensors without numpy."""
import warnings

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from mil_test_utils import run_mil
from python_coreml_sd.runtime.mil import MILModel


def _program(x):
    # A conv-free chain with fp16 rounding points: what Inductor fuses into one kernel.
    y = mb.mul(x=x, y=np.float16(1.5))
    y = mb.add(x=y, y=np.float16(0.25))
    y = mb.silu(x=y)
    return mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compiled")
    run_mil(_program, {"x": np.zeros((2, 3, 16), np.float16)}, folder)
    return next(folder.glob("*.mlpackage"))


def _feed(seed):
    return {"x": np.random.default_rng(seed).normal(size=(2, 3, 16)).astype(np.float16)}


def test_compiled_plan_equals_op_by_op(package):
    eager, compiled = MILModel(package), MILModel(package, torch_compile=True)
    for seed in range(2):  # the second call runs the compiled graph on new values
        a = next(iter(eager.predict(_feed(seed)).values()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b = next(iter(compiled.predict(_feed(seed)).values()))
        assert not [w for w in caught if "torch.compile failed" in str(w.message)]
        assert b.dtype == a.dtype == np.float16
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=2e-3, atol=2e-3)
        assert not np.array_equal(a, np.zeros_like(a))


def test_failed_compilation_falls_back_with_a_warning(package, monkeypatch):
    def broken_compile(fn, **_):
        def fail(*_args):
            raise RuntimeError("inductor unavailable")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = MILModel(package, torch_compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = next(iter(model.predict(_feed(0)).values()))
    assert any("torch.compile failed" in str(w.message) for w in caught)
    ref = next(iter(MILModel(package).predict(_feed(0)).values()))
    np.testing.assert_array_equal(out, ref)


def test_predict_tensors_returns_device_tensors(package):
    model = MILModel(package)
    x = torch.from_numpy(_feed(1)["x"].astype(np.float32))
    out = next(iter(model.predict_tensors({"x": x}).values()))
    assert isinstance(out, torch.Tensor)
    ref = next(iter(model.predict(_feed(1)).values()))
    np.testing.assert_array_equal(out.numpy().astype(np.float16), ref)


def test_predict_tensors_checks_shapes(package):
    from python_coreml_sd.errors import UserError
    with pytest.raises(UserError, match="has shape"):
        MILModel(package).predict_tensors({"x": torch.zeros(2, 3, 8)})
