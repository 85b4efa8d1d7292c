"""Cross-check against coremltools' own value inference (each op's numpy reference in PyMIL) where
it exists: the op is built on constants, coremltools computes `.val`, the runtime's plan folds the
same op with its torch kernel."""
import numpy as np
import pytest
import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Placeholder, types

from python_coreml_sd.runtime.mil.plan import Plan

rng = np.random.default_rng(3)
X = rng.uniform(-3, 3, size=(2, 3, 4, 5)).astype(np.float32)
P = rng.uniform(0.1, 3, size=(2, 3, 4, 5)).astype(np.float32)
I = rng.integers(-4, 4, size=(2, 3)).astype(np.int32)

CASES = {
    "mod": lambda: mb.mod(x=X, y=np.float32(1.3)),
    "floor_div": lambda: mb.floor_div(x=X, y=np.float32(0.7)),
    "pow": lambda: mb.pow(x=P, y=np.float32(1.7)),
    "round": lambda: mb.round(x=np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49], np.float32)),
    "clip": lambda: mb.clip(x=X, alpha=-1.0, beta=1.5),
    "inverse": lambda: mb.inverse(x=P),
    "log": lambda: mb.log(x=P),
    "rsqrt": lambda: mb.rsqrt(x=P),
    "sign": lambda: mb.sign(x=X),
    "erf": lambda: mb.erf(x=X),
    "softmax": lambda: mb.softmax(x=X, axis=2),
    "elu": lambda: mb.elu(x=X, alpha=0.5),
    "leaky_relu": lambda: mb.leaky_relu(x=X, alpha=0.1),
    "sigmoid_hard": lambda: mb.sigmoid_hard(x=X, alpha=0.3, beta=0.2),
    "cast_int": lambda: mb.cast(x=X, dtype="int32"),
    "reduce_sum": lambda: mb.reduce_sum(x=X, axes=[1, -1], keep_dims=True),
    "reduce_argmax": lambda: mb.reduce_argmax(x=X, axis=2),
    "slice_by_index": lambda: mb.slice_by_index(x=X, begin=[0, 2, 3, 0], end=[2, 0, 0, 5], stride=[1, -1, -2, 2],
                                                begin_mask=[True, False, False, True], end_mask=[False, True, True, False]),
    "slice_by_size": lambda: mb.slice_by_size(x=X, begin=[1, 0, 1, 2], size=[1, -1, 2, 3]),
    "transpose": lambda: mb.transpose(x=X, perm=[3, 1, 0, 2]),
    "concat": lambda: mb.concat(values=[X, X * 2], axis=-2),
    # (concat with interleave is checked against the reference's worked example in test_mil_ops:
    # coremltools' value inference ignores `interleave`.)
    "split": lambda: mb.split(x=X, split_sizes=[1, 4], axis=3),
    "tile": lambda: mb.tile(x=X, reps=[1, 2, 1, 2]),
    "pad_reflect": lambda: mb.pad(x=X, pad=[1, 2, 0, 3], mode="reflect"),
    "pad_replicate": lambda: mb.pad(x=X, pad=[2, 1, 1, 1, 0, 2], mode="replicate"),
    "pad_constant": lambda: mb.pad(x=X, pad=[1, 0, 0, 2], mode="constant", constant_val=-1.0),
    "gather": lambda: mb.gather(x=X, indices=I, axis=2),
    "gather_along_axis": lambda: mb.gather_along_axis(x=X, indices=np.abs(I).reshape(2, 3, 1, 1) % 4 * np.ones((1, 1, 1, 5), np.int32), axis=2),
    "matmul": lambda: mb.matmul(x=X, y=P, transpose_y=True),
    "linear": lambda: mb.linear(x=X, weight=P[0, 0], bias=np.arange(4, dtype=np.float32)),
    "einsum": lambda: mb.einsum(values=(X, P.transpose(0, 3, 2, 1)), equation="nchw,nwhu->nchu"),
    "layer_norm": lambda: mb.layer_norm(x=X, axes=[1, 3], epsilon=1e-3),
    "instance_norm": lambda: mb.instance_norm(x=X, epsilon=1e-3),
    "band_part": lambda: mb.band_part(x=X, lower=1, upper=2),
    "cumsum": lambda: mb.cumsum(x=X, axis=2, exclusive=False, reverse=True),  # exclusive=True crashes there
    "depth_to_space": lambda: mb.depth_to_space(x=np.tile(X, (1, 4, 1, 1)), block_size=2),
    "space_to_depth": lambda: mb.space_to_depth(x=X[..., :4], block_size=2),
    "upsample_nearest": lambda: mb.upsample_nearest_neighbor(x=X, scale_factor_height=2, scale_factor_width=3),
    "reverse": lambda: mb.reverse(x=X, axes=[1, 3]),
    "select": lambda: mb.select(cond=X > 0, a=X, b=P),
    "argsort": lambda: mb.argsort(x=X, axis=-1),
    "topk": lambda: mb.topk(x=X, k=3, axis=1),
    "range_1d": lambda: mb.range_1d(start=2.0, end=9.0, step=1.5),
}


def _evaluate(build):
    with Function({"unused": Placeholder((1,), dtype=types.fp32)}, opset_version=ct.target.iOS17) as func:
        out = build()
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        func.set_outputs(outs)
    expected = [o.val for o in outs]
    plan = Plan(func, "cpu")
    got = [t.numpy() for t in plan.run(list(plan.env_init))]
    return expected, got


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_coremltools_value_inference(name):
    expected, got = _evaluate(CASES[name])
    for e, g in zip(expected, got):
        if e is None:
            pytest.skip(f"coremltools has no value inference for {name}")
        np.testing.assert_allclose(g, np.asarray(e).reshape(g.shape), rtol=1e-5, atol=1e-5)
        assert tuple(np.shape(e)) == tuple(g.shape)
