"""random_* ops (statistical: Core ML's streams are undocumented, so checked in distribution),
`fill` / random shapes computed at run time, outputs of unknown rank, and crop_resize UNALIGN_CORNERS
staying refused. Each through a saved .mlpackage."""
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from mil_test_utils import mil_package, run_mil
from python_coreml_sd.runtime.mil import MILModel

X = {"x": np.zeros(1, np.float32)}
SHAPE = np.array([200, 50, 20], np.int32)  # 200,000 draws: mean / variance within 1% of the truth


def random_model(tmp_path, make, target="iOS17"):
    """A model whose second output is `make()` (the first keeps a model input)."""
    return MILModel(mil_package(lambda x: [mb.add(x=x, y=x), make()], {"x": ((1,), np.float32)}, tmp_path, target))


def draws(model, inputs=X):
    return model.predict(inputs)[model.plan.output_names[1]]


@pytest.mark.parametrize("name,make,lo,hi,mean,var", [
    ("normal", lambda s: mb.random_normal(shape=SHAPE, mean=1.5, stddev=2.0, seed=s), -np.inf, np.inf, 1.5, 4.0),
    ("uniform", lambda s: mb.random_uniform(shape=SHAPE, low=-1.0, high=3.0, seed=s), -1.0, 3.0, 1.0, 16 / 12),
    ("bernoulli", lambda s: mb.random_bernoulli(shape=SHAPE, prob=0.3, seed=s), 0.0, 1.0, 0.3, 0.21),
])
def test_random_distributions_and_seeds(name, make, lo, hi, mean, var, tmp_path):
    seeded, other, unseeded = (random_model(tmp_path, lambda s=s: make(s)) for s in (7, 8, -1))
    y = draws(seeded)
    assert y.shape == tuple(SHAPE) and y.dtype == np.float32
    assert lo <= y.min() and y.max() <= hi
    assert abs(y.mean() - mean) < 0.02 * max(1.0, abs(mean)) and abs(y.var() - var) < 0.02 * var
    if name == "bernoulli":
        assert set(np.unique(y)) == {0.0, 1.0}
    np.testing.assert_array_equal(y, draws(seeded))  # same seed: same values at every call
    assert not np.array_equal(y, draws(other))  # another seed: other values
    assert not np.array_equal(draws(unseeded), draws(unseeded))  # unseeded: not folded at load


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_random_categorical_frequencies(mode, tmp_path):
    p = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], np.float32)
    x = np.log(p) + 3.0 if mode == "logits" else p * 2.0  # unnormalized either way
    path = mil_package(lambda x: mb.random_categorical(x=x, mode=mode, size=40000, seed=3),
                       {"x": (p.shape, np.float32)}, tmp_path)
    model = MILModel(path)
    y = model.predict({"x": x})[model.plan.output_names[0]]
    assert y.shape == (2, 40000) and y.dtype == np.float32
    freq = np.stack([np.bincount(row.astype(np.int64), minlength=3) / 40000 for row in y])
    np.testing.assert_allclose(freq, p, atol=0.01)
    np.testing.assert_array_equal(y, model.predict({"x": x})[model.plan.output_names[0]])


def test_fp16_random_outputs_and_run_time_shape(tmp_path):
    shape = np.array([3, 4], np.int32)
    path = mil_package(lambda s: mb.random_uniform(shape=s, low=np.float16(2.0), high=np.float16(2.5), seed=1),
                       {"s": ((2,), np.int32)}, tmp_path)
    model = MILModel(path)
    y = model.predict({"s": shape})[model.plan.output_names[0]]
    assert y.shape == (3, 4) and y.dtype == np.float16 and 2.0 <= y.min() and y.max() <= 2.5


def test_fill_with_a_run_time_shape(tmp_path):
    shape = np.array([2, 3], np.int32)
    out = run_mil(lambda s: mb.fill(shape=mb.add(x=s, y=1), value=4.0), {"s": shape}, tmp_path)[0]
    np.testing.assert_array_equal(out, np.full((3, 4), 4.0, np.float32))


def test_fill_whose_output_rank_is_known_only_at_run_time(tmp_path):
    """The shape input is flexible in length, so the output's rank is variadic in the file."""
    import coremltools as ct
    from coremltools.converters.mil.mil import get_new_symbol

    path = mil_package(lambda shape: mb.fill(shape=shape, value=1.5), {"shape": ((get_new_symbol(),), np.int32)},
                       tmp_path, ct_inputs=[ct.TensorType(name="shape", shape=(ct.RangeDim(1, 4),), dtype=np.int32)])
    model = MILModel(path)
    name = model.plan.output_names[0]
    for shape in ([2, 1, 3], [5], [1, 2, 2, 2]):
        out = model.predict({"shape": np.array(shape, np.int32)})[name]
        np.testing.assert_array_equal(out, np.full(shape, 1.5, np.float32))


def test_crop_resize_unalign_corners_is_refused_by_name(tmp_path):
    from python_coreml_sd.runtime.mil.plan import UnsupportedOpError

    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    roi = np.array([0, 0, 0, 1, 1], np.float32).reshape(1, 1, 5, 1, 1)
    with pytest.raises(UnsupportedOpError, match="crop_resize.*'UNALIGN_CORNERS'"):
        run_mil(lambda x: mb.crop_resize(x=x, roi=roi, target_height=2, target_width=2, normalized_coordinates=True,
                                         sampling_mode="UNALIGN_CORNERS"), {"x": x}, tmp_path, target="iOS15")


@pytest.mark.cuda
def test_random_ops_on_cuda_run_op_by_op_even_with_cuda_graph(tmp_path):
    make = lambda: mb.random_normal(shape=SHAPE, mean=1.5, stddev=2.0, seed=5)  # noqa: E731
    path = mil_package(lambda x: [mb.add(x=x, y=x), make()], {"x": ((1,), np.float32)}, tmp_path)
    model = MILModel(path, device="cuda", cuda_graph=True)
    assert not model._use_graph  # a captured graph would replay one draw
    y = draws(model)
    assert abs(y.mean() - 1.5) < 0.03 and abs(y.var() - 4.0) < 0.08
    np.testing.assert_array_equal(y, draws(model))
