"""Palettizing converted models: Apple's LUT ops, expected sizes, exact LUT values, safe writes."""
import os

import numpy as np
import pytest

from python_coreml_sd.compression import testbed
from python_coreml_sd.compression.kmeans import palettize_array
from python_coreml_sd.compression.palettize import (
    WEIGHT_THRESHOLD, decode_lut_op, lut_weights, palettize_mlpackage)
from python_coreml_sd.package_io import mil_program
from python_coreml_sd.errors import UserError
from python_coreml_sd.metrics import psnr

import coremltools as ct  # noqa: E402  (a missing coremltools is a failure, not a skip)
LARGE = {"conv1_weight_to_fp16": (64, 8, 3, 3), "conv2_weight_to_fp16": (64, 64, 3, 3),
         "fc_weight_to_fp16": (96, 512)}
# Output PSNR (MIL runtime, fp16) against the unpalettized fp16 model, measured on this net;
# floors sit a few dB under the measured values (see docs/compression.md).
PSNR_FLOOR = {1: 10, 2: 16, 4: 26, 6: 38, 8: 50}  # measured: 12.0, 18.1, 28.5, 41.1, 53.8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    net, inputs = testbed.small_net()
    path = testbed.convert(net, inputs, tmp_path_factory.mktemp("src") / "small.mlpackage")
    return path, testbed.numpy_inputs(inputs)


def load(path):
    return ct.models.MLModel(str(path), skip_model_load=True)


def const_ops(mlmodel):
    """Plain weight consts (not the indices/LUT inputs of a constexpr op)."""
    ops = []
    for func in mil_program(mlmodel).functions.values():
        ops += [op for op in func.operations if op.op_type == "const" and isinstance(op.val.val, np.ndarray)
                and not any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)]
    return ops


def weight_bytes(pkg):
    return os.path.getsize(pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")


def run(pkg, inputs):
    from python_coreml_sd.runtime.mil import MILModel

    return MILModel(pkg).predict(inputs)["output"]


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_every_large_weight_becomes_a_lut(source, tmp_path, nbits):
    src, inputs = source
    dst = palettize_mlpackage(src, tmp_path / "pal.mlpackage", nbits)
    model = load(dst)
    # Only small tensors (biases, norms, the thin conv) are left as plain consts.
    assert all(op.val.val.size <= WEIGHT_THRESHOLD for op in const_ops(model))
    decoded = lut_weights(model)
    assert set(decoded) == set(LARGE)
    originals = {op.name: op.val.val for op in const_ops(load(src))}
    for name, shape in LARGE.items():
        lut, indices = palettize_array(originals[name], nbits)
        assert decoded[name].shape == shape and decoded[name].dtype == np.float16
        np.testing.assert_array_equal(decoded[name], lut[indices])
        assert set(np.unique(decoded[name])) <= set(lut)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_file_shrinks_as_expected(source, tmp_path, nbits):
    src, _ = source
    dst = palettize_mlpackage(src, tmp_path / "pal.mlpackage", nbits)
    large = sum(int(np.prod(s)) for s in LARGE.values())
    small_fp16 = weight_bytes(src) - 2 * large
    expected = small_fp16 + large * nbits / 8 + len(LARGE) * 2 * (1 << nbits)
    # Blobs are 64-byte aligned with a small header each: allow 128 bytes per large weight.
    assert expected * 0.98 <= weight_bytes(dst) <= expected + 128 * len(LARGE)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_output_psnr_floor(source, tmp_path, nbits):
    src, inputs = source
    dst = palettize_mlpackage(src, tmp_path / "pal.mlpackage", nbits)
    value = psnr(run(src, inputs), run(dst, inputs))
    assert value >= PSNR_FLOOR[nbits], value


def test_per_grouped_channel_has_one_lut_per_group(source, tmp_path):
    src, _ = source
    dst = palettize_mlpackage(src, tmp_path / "pal.mlpackage", 4, granularity="per_grouped_channel", group_size=16)
    ops = {op.name: op for func in mil_program(load(dst)).functions.values()
           for op in func.operations if op.op_type == "constexpr_lut_to_dense"}
    op = ops["conv2_weight_to_fp16_palettized"]
    lut = op.lut.val
    assert lut.shape == (4, 1, 1, 1, 16, 1)  # 64 output channels / 16 per group
    dense = decode_lut_op(op)
    for g in range(4):
        assert set(np.unique(dense[16 * g:16 * (g + 1)])) <= set(lut[g, 0, 0, 0, :, 0])
    per_tensor = lut_weights(load(palettize_mlpackage(src, tmp_path / "pt.mlpackage", 4)))
    original = {o.name: o.val.val for o in const_ops(load(src))}["conv2_weight_to_fp16"].astype(np.float64)
    # Four tables fit the weights at least as well as one.
    assert np.mean((dense - original) ** 2) <= np.mean((per_tensor["conv2_weight_to_fp16"] - original) ** 2)


def test_deterministic(source, tmp_path):
    src, _ = source
    a = palettize_mlpackage(src, tmp_path / "a.mlpackage", 6)
    b = palettize_mlpackage(src, tmp_path / "b.mlpackage", 6)
    assert (a / "Data/com.apple.CoreML/weights/weight.bin").read_bytes() == \
        (b / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()


def test_never_clobbers_unless_asked(source, tmp_path):
    src, _ = source
    dst = tmp_path / "pal.mlpackage"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists"):
        palettize_mlpackage(src, dst, 4)
    assert (dst / "keep.txt").read_text() == "mine"
    palettize_mlpackage(src, dst, 4, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "Manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pal.mlpackage"]  # no temp folders left


def test_bad_arguments(source, tmp_path):
    src, _ = source
    with pytest.raises(UserError, match="nbits"):
        palettize_mlpackage(src, tmp_path / "x.mlpackage", 5)
    with pytest.raises(UserError, match="granularity"):
        palettize_mlpackage(src, tmp_path / "x.mlpackage", 4, granularity="per_block")
    with pytest.raises(UserError, match="not an .mlpackage"):
        palettize_mlpackage(tmp_path, tmp_path / "x.mlpackage", 4)


def test_same_bytes_as_coremltools_own_entry_point(source, tmp_path):
    """We skip re-running the default pipeline; the package must not change because of it."""
    import coremltools.optimize.coreml as cto

    from python_coreml_sd.compression.palettize import op_config

    src, _ = source
    ours = palettize_mlpackage(src, tmp_path / "ours.mlpackage", 4)
    config = cto.OptimizationConfig(global_config=op_config(4))
    theirs = tmp_path / "theirs.mlpackage"
    cto.palettize_weights(load(src), config).save(str(theirs))
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    assert (ours / weights).read_bytes() == (theirs / weights).read_bytes()

    # Auto-generated op names (cast_0 / cast_1, ..._lut_7) follow per-process counters, and the order of
    # independent consts follows those names: compare each op with what it reads, names aside.
    def structure(pkg):
        ops = [op for f in mil_program(load(pkg)).functions.values() for op in f.operations]
        producers = {v.name: op.op_type for op in ops for v in op.outputs}
        return sorted((op.op_type, tuple(v.shape for v in op.outputs),
                       tuple(sorted(producers.get(v.name, "input") for v in _input_vars(op)))) for op in ops)

    assert structure(ours) == structure(theirs)


def _input_vars(op):
    return [v for value in op.inputs.values() for v in (value if isinstance(value, (list, tuple)) else [value])]


def test_parallel_plan_gives_the_same_bytes(source, tmp_path, monkeypatch):
    """Large models cluster every weight ahead in worker processes; the package must not change."""
    from python_coreml_sd.compression import palettize

    src, _ = source
    serial = palettize_mlpackage(src, tmp_path / "serial.mlpackage", 6)
    started = []
    monkeypatch.setattr(palettize, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(palettize, "worker_count", lambda: 2)
    monkeypatch.setattr(palettize.LutPlan, "start", _spy(palettize.LutPlan.start, started))
    parallel = palettize_mlpackage(src, tmp_path / "parallel.mlpackage", 6)
    assert started and len(started[0]) == len(LARGE)  # every large weight was planned, nothing else
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    assert (serial / weights).read_bytes() == (parallel / weights).read_bytes()


def _spy(start, calls):
    def wrapped(self, weights_and_bits, *args):
        weights_and_bits = list(weights_and_bits)
        calls.append(weights_and_bits)
        return start(self, weights_and_bits, *args)
    return wrapped


@pytest.mark.cuda
def test_cuda_histograms_give_the_same_bytes(source, tmp_path):
    src, _ = source
    cpu = palettize_mlpackage(src, tmp_path / "cpu.mlpackage", 4, device="cpu")
    gpu = palettize_mlpackage(src, tmp_path / "gpu.mlpackage", 4, device="cuda")
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    assert (cpu / weights).read_bytes() == (gpu / weights).read_bytes()


def test_device_is_checked(source, tmp_path):
    import torch

    src, _ = source
    with pytest.raises(UserError, match="device must be"):
        palettize_mlpackage(src, tmp_path / "x.mlpackage", 4, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            palettize_mlpackage(src, tmp_path / "x.mlpackage", 4, device="cuda")
    assert not (tmp_path / "x.mlpackage").exists()
