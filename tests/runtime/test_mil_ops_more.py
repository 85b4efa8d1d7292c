"""Ops of coremltools' opsets beyond what Stable Diffusion emits (issue 22), and run-time values
where the SD ops have constants: each against NumPy, through a real .mlpackage round trip."""
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from mil_test_utils import run_mil

rng = np.random.default_rng(22)


def rand(*shape, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def close(out, ref, tol=1e-5):
    ref = np.asarray(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol)


# ---- slices with run-time bounds -------------------------------------------------------------

@pytest.mark.parametrize("b,sizes,stride,squeeze", [
    ([1, 2], [2, 3], [1, 1], [False, False]),
    ([-3, 0], [2, 4], [1, 2], [False, False]),
    ([2, 1], [1, 4], [1, 1], [True, False]),
    ([3, 5], [-2, -4], [-1, -2], [False, False]),
])
def test_slice_by_index_with_run_time_bounds(b, sizes, stride, squeeze, tmp_path):
    x = rand(4, 6)
    begin = np.array(b, np.int32)

    def build(x, begin):
        end = mb.add(x=begin, y=np.array(sizes, np.int32))  # computed at run time
        return mb.slice_by_index(x=x, begin=begin, end=end, stride=np.array(stride, np.int32),
                                 squeeze_mask=np.array(squeeze))

    out = run_mil(build, {"x": x, "begin": begin}, tmp_path)[0]
    e = [bi + si for bi, si in zip(b, sizes)]
    idx = tuple(bi if sq else slice(bi, ei if ei != -1 or st > 0 else None, st)
                for bi, ei, st, sq in zip(b, e, stride, squeeze))
    close(out, x[idx])


def test_slice_by_size_with_run_time_begin_and_size(tmp_path):
    x = rand(3, 5, 4)

    def build(x, begin):
        size = mb.sub(x=np.array([2, 3, 1], np.int32), y=begin)  # (1, 3, -1) at run time
        return mb.slice_by_size(x=x, begin=begin, size=size)

    out = run_mil(build, {"x": x, "begin": np.array([1, 0, 2], np.int32)}, tmp_path)[0]
    close(out, x[1:2, 0:3, 2:])  # size -1: to the end of the axis


def test_slice_from_a_run_time_shape(tmp_path):
    # The pattern of data-dependent lengths: slice as many rows as the non_zero count.
    x, m = rand(5, 3), np.array([1, 0, 1, 1, 0], np.float32)

    def build(x, m):
        n = mb.slice_by_index(x=mb.shape(x=mb.non_zero(x=m)), begin=[0], end=[1])
        begin = mb.concat(values=[np.array([0], np.int32), np.array([0], np.int32)], axis=0)
        end = mb.concat(values=[n, np.array([3], np.int32)], axis=0)
        return mb.slice_by_index(x=x, begin=begin, end=end)

    close(run_mil(build, {"x": x, "m": m}, tmp_path)[0], x[:3])
