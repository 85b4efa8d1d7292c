"""tiny's UNet palettized at each bit width: LUT ops everywhere, size, output PSNR (MIL runtime)."""
import os

import numpy as np
import pytest

from python_coreml_sd.compression import testbed
from python_coreml_sd.compression.palettize import WEIGHT_THRESHOLD, lut_weights, palettize_mlpackage
from python_coreml_sd.package_io import mil_program
from python_coreml_sd.metrics import psnr

import coremltools as ct  # noqa: E402  (a missing coremltools is a failure, not a skip)
# Measured on tiny (seed 0) with the MIL runtime on CPU: 11.9, 15.1, 25.4, 37.8, 49.0 dB.
PSNR_FLOOR = {1: 10, 2: 13, 4: 23, 6: 35, 8: 46}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from python_coreml_sd.runtime.mil import MILModel

    model, inputs = testbed.unet("tiny")
    src = testbed.convert(model, inputs, tmp_path_factory.mktemp("tiny") / "unet.mlpackage")
    x = testbed.numpy_inputs(inputs)
    return src, x, MILModel(src).predict(x)["output"]


def large_weights(pkg):
    prog = mil_program(ct.models.MLModel(str(pkg), skip_model_load=True))
    return {op.name: op.val.val for f in prog.functions.values() for op in f.operations
            if op.op_type == "const" and isinstance(op.val.val, np.ndarray) and op.val.val.size > WEIGHT_THRESHOLD
            and not any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)}


def weight_bytes(pkg):
    return os.path.getsize(pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_tiny_unet(tiny, tmp_path, nbits):
    from python_coreml_sd.runtime.mil import MILModel

    src, x, reference = tiny
    before = large_weights(src)
    dst = palettize_mlpackage(src, tmp_path / "unet.mlpackage", nbits)
    model = ct.models.MLModel(str(dst), skip_model_load=True)
    assert large_weights(dst) == {}
    assert set(lut_weights(model)) == set(before)
    large = sum(v.size for v in before.values())
    expected = weight_bytes(src) - large * (2 - nbits / 8) + len(before) * 2 * (1 << nbits)
    assert expected * 0.98 <= weight_bytes(dst) <= expected + 128 * len(before)
    value = psnr(reference, MILModel(dst).predict(x)["output"])
    assert value >= PSNR_FLOOR[nbits], value
