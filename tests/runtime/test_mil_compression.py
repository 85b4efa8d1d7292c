"""Compression ops (constexpr_*): worked examples from the MIL op reference, hand-packed bits, and
whole models compressed by coremltools.optimize compared with their decompressed program."""
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from mil_test_utils import run_mil


def _plus(dense_fn, shape, tmp_path, target, dtype=np.float32):
    """Runs x + constexpr(...) with x = 0: the output is the decompressed constant."""
    x = np.zeros(shape, dtype)
    return run_mil(lambda x: mb.add(x=x, y=dense_fn()), {"x": x}, tmp_path, target=target)[0]


def _pack_lsb_first(values, nbits):
    bits = [(int(v) >> b) & 1 for v in values for b in range(nbits)]
    bits += [0] * (-len(bits) % 8)
    return np.array([sum(bits[i + b] << b for b in range(8)) for i in range(0, len(bits), 8)], np.uint8)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_lut_to_dense_iOS16_packed_indices(nbits, tmp_path):
    rng = np.random.default_rng(nbits)
    shape = (3, 5)
    idx = rng.integers(0, 2 ** nbits, size=15)
    lut = rng.normal(size=2 ** nbits).astype(np.float32)
    packed = _pack_lsb_first(idx, nbits)
    out = _plus(lambda: mb.constexpr_lut_to_dense(indices=packed, lut=lut, shape=np.array(shape, np.uint32)),
                shape, tmp_path, "iOS16")
    np.testing.assert_array_equal(out, lut[idx].reshape(shape))


def test_lut_to_dense_iOS17_target_uses_the_iOS16_form(tmp_path):
    lut = np.array([1.0, -2.0, 3.5, 0.25], np.float16)
    idx = [3, 0, 1, 2, 2, 1]
    out = _plus(lambda: mb.constexpr_lut_to_dense(indices=_pack_lsb_first(idx, 2), lut=lut, shape=np.array([2, 3], np.uint32)),
                (2, 3), tmp_path, "iOS17", np.float16)
    np.testing.assert_array_equal(out, lut[idx].reshape(2, 3))


def test_lut_to_dense_iOS18_per_group_reference_example(tmp_path):
    """Case 1 of the iOS18 constexpr_lut_to_dense reference."""
    indices = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3]).reshape(6, 2).astype(types.np_uint2_dtype)
    lut = np.array([1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0], np.float16).reshape(2, 1, 4, 1)
    out = _plus(lambda: mb.constexpr_lut_to_dense(indices=indices, lut=lut), (6, 2), tmp_path, "iOS18", np.float16)
    expected = [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]]
    np.testing.assert_array_equal(out, np.array(expected, np.float16))


@pytest.mark.parametrize("vector_axis", [1, 2])
def test_lut_to_dense_iOS18_vector_reference_example(vector_axis, tmp_path):
    """Case 2 of the reference: 1-bit vector palettization, vectors of 3 along `vector_axis`."""
    indices = np.array([0, 0, 1, 0, 1, 1, 0, 0]).reshape(2, 2, 2).astype(types.np_uint1_dtype)
    a, b = [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]
    lut = np.array(a + b, np.float32).reshape(1, 1, 1, 2, 3)
    shape = (2, 6, 2) if vector_axis == 1 else (2, 2, 6)
    out = _plus(lambda: mb.constexpr_lut_to_dense(indices=indices, lut=lut, vector_axis=np.int32(vector_axis)),
                shape, tmp_path, "iOS18")
    if vector_axis == 1:
        expected = [[[a[i], a[i]] for i in range(3)] + [[b[i], a[i]] for i in range(3)],
                    [[b[i], b[i]] for i in range(3)] + [[a[i], a[i]] for i in range(3)]]
    else:
        expected = [[a + a, b + a], [b + b, a + a]]
    np.testing.assert_array_equal(out, np.array(expected, np.float32))


@pytest.mark.parametrize("axis", [0, 1])
def test_affine_dequantize_per_channel(axis, tmp_path):
    rng = np.random.default_rng(axis)
    q = rng.integers(0, 256, size=(3, 4)).astype(np.uint8)
    n = q.shape[axis]
    zp = rng.integers(0, 256, size=n).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, size=n).astype(np.float32)
    out = _plus(lambda: mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=axis),
                (3, 4), tmp_path, "iOS16")
    view = (-1, 1) if axis == 0 else (1, -1)
    expected = (q.astype(np.float64) - zp.reshape(view)) * scale.reshape(view)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_affine_dequantize_scalar_params_int8(tmp_path):
    q = np.array([[-128, -1, 0, 127]], np.int8)
    out = _plus(lambda: mb.constexpr_affine_dequantize(quantized_data=q, zero_point=np.int8(-1), scale=np.float32(0.5), axis=0),
                (1, 4), tmp_path, "iOS16")
    np.testing.assert_array_equal(out, [[-63.5, 0.0, 0.5, 64.0]])


def test_blockwise_shift_scale_reference_example(tmp_path):
    data = np.array([4, 8, 10, 13, 24, 5, 6, 9]).reshape(1, 2, 4).astype(np.int8)
    scale = np.array([4, 8]).reshape(1, 1, 2).astype(np.float16)
    offset = np.array([4, 0]).reshape(1, 1, 2).astype(np.int8)
    out = _plus(lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset), (1, 2, 4), tmp_path,
                "iOS18", np.float16)
    # blocks of 2 along the last axis: scale 4 / offset 4 for k < 2, scale 8 / offset 0 for k >= 2
    expected = [[[0, 16, 80, 104], [80, 4, 48, 72]]]
    np.testing.assert_array_equal(out, np.array(expected, np.float16))


def test_blockwise_shift_scale_int4_no_offset(tmp_path):
    data = np.array([4, 0, -8, 0, -6, 0, -3, 7]).reshape(2, 4).astype(types.np_int4_dtype)
    scale = np.array([[0.5, 2.0], [1.0, 3.0]], np.float32)
    out = _plus(lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale), (2, 4), tmp_path, "iOS18")
    expected = np.array([[2, 0, -16, 0], [-6, 0, -9, 21]], np.float32)
    np.testing.assert_array_equal(out, expected)


def test_sparse_to_dense_iOS16_and_constexpr_cast(tmp_path):
    mask_bits = [1, 0, 0, 1, 1, 0]
    values = np.array([1.5, -2.0, 3.0], np.float32)
    out = _plus(lambda: mb.constexpr_sparse_to_dense(nonzero_data=values, mask=_pack_lsb_first(mask_bits, 1),
                                                     shape=np.array([2, 3], np.uint32)), (2, 3), tmp_path, "iOS16")
    np.testing.assert_array_equal(out, [[1.5, 0, 0], [-2.0, 3.0, 0]])
    src = np.array([0.1, 65504.0], np.float16)
    out = _plus(lambda: mb.constexpr_cast(source_val=src, output_dtype="fp32"), (2,), tmp_path, "iOS16")
    np.testing.assert_array_equal(out, src.astype(np.float32))


# ---- whole models compressed by coremltools.optimize ----------------------------------------

def _small_convnet():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 16, 1),
        torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 64),
    ).eval()


def _compressed_vs_decompressed(tmp_path, target, compress):
    import coremltools as ct
    import torch

    from python_coreml_sd.metrics import psnr
    from python_coreml_sd.runtime.mil import MILModel
    from mil_test_utils import convert

    x = torch.randn(1, 8, 6, 6)
    base = convert(_small_convnet(), (x,), ["x"], tmp_path / "base.mlpackage", "fp16", target)
    model = ct.models.MLModel(str(base), skip_model_load=True)
    compressed = compress(model)
    compressed.save(str(tmp_path / "c.mlpackage"))
    ct.optimize.coreml.decompress_weights(compressed).save(str(tmp_path / "d.mlpackage"))
    runtime = MILModel(tmp_path / "c.mlpackage")
    inputs = {"x": x.numpy()}
    got = list(runtime.predict(inputs).values())[0]
    want = list(MILModel(tmp_path / "d.mlpackage").predict(inputs).values())[0]
    return psnr(want, got), set(runtime.op_types)


@pytest.mark.parametrize("target,granularity", [("iOS16", "per_tensor"), ("iOS18", "per_grouped_channel")])
def test_palettized_model_matches_decompressed_program(target, granularity, tmp_path):
    import coremltools as ct

    kw = {"group_size": 8} if granularity == "per_grouped_channel" else {}
    config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpPalettizerConfig(
        mode="uniform", nbits=4, granularity=granularity, weight_threshold=0, **kw))
    value, ops = _compressed_vs_decompressed(tmp_path, target, lambda m: ct.optimize.coreml.palettize_weights(m, config))
    assert "constexpr_lut_to_dense" in ops
    assert value == float("inf") or value > 100


@pytest.mark.parametrize("target,op_type", [("iOS16", "constexpr_affine_dequantize"), ("iOS18", "constexpr_blockwise_shift_scale")])
def test_linear_quantized_model_matches_decompressed_program(target, op_type, tmp_path):
    import coremltools as ct

    config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", weight_threshold=0))
    value, ops = _compressed_vs_decompressed(tmp_path, target, lambda m: ct.optimize.coreml.linear_quantize_weights(m, config))
    assert op_type in ops
    assert value == float("inf") or value > 100
