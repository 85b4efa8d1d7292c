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


# ---- scatter family --------------------------------------------------------------------------

def np_combine(mode, old, new):
    return {"update": lambda: new, "add": lambda: old + new, "sub": lambda: old - new, "mul": lambda: old * new,
            "div": lambda: old / new, "max": lambda: np.maximum(old, new), "min": lambda: np.minimum(old, new)}[mode]()


MODES = ["update", "add", "sub", "mul", "div", "max", "min"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_repeated_indices_combine_in_order(mode, axis, tmp_path):
    data = rand(3, 4, 5, lo=0.5, hi=2)
    n = data.shape[axis]
    indices = np.array([1, -1, 1, 0], np.int32)  # 1 twice (in order), -1 wraps to the last
    ushape = list(data.shape)
    ushape[axis] = len(indices)
    updates = rand(*ushape, lo=0.5, hi=2)
    out = run_mil(lambda d, u: mb.scatter(data=d, indices=indices, updates=u, axis=axis, mode=mode),
                  {"d": data, "u": updates}, tmp_path)[0]
    ref = np.moveaxis(data.astype(np.float64).copy(), axis, 0)
    u = np.moveaxis(updates.astype(np.float64), axis, 0)
    for i, row in enumerate(indices % n):
        ref[row] = np_combine(mode, ref[row], u[i])
    close(out, np.moveaxis(ref, 0, axis), 1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", [0, 2])
def test_scatter_along_axis(mode, axis, tmp_path):
    data = rand(3, 4, 5, lo=0.5, hi=2)
    kshape = list(data.shape)
    kshape[axis] = 2
    indices = rng.integers(-data.shape[axis], data.shape[axis], size=kshape).astype(np.int32)
    indices.reshape(-1)[:2] = 0  # make sure some positions repeat
    updates = rand(*kshape, lo=0.5, hi=2)
    out = run_mil(lambda d, i, u: mb.scatter_along_axis(data=d, indices=i, updates=u, axis=axis, mode=mode),
                  {"d": data, "i": indices, "u": updates}, tmp_path)[0]
    ref = data.astype(np.float64).copy()
    for pos in np.ndindex(*kshape):
        tgt = list(pos)
        tgt[axis] = indices[pos] % data.shape[axis]
        ref[tuple(tgt)] = np_combine(mode, ref[tuple(tgt)], updates[pos])
    close(out, ref, 1e-5)


def test_scatter_int32_and_refused_integer_div(tmp_path):
    from python_coreml_sd.runtime.mil.plan import UnsupportedOpError

    data = np.arange(12, dtype=np.int32).reshape(4, 3)
    upd = np.full((2, 3), 5, np.int32)
    out = run_mil(lambda d, u: mb.scatter(data=d, indices=np.array([2, 2], np.int32), updates=u, mode="max"),
                  {"d": data, "u": upd}, tmp_path)[0]
    ref = data.copy()
    ref[2] = np.maximum(ref[2], 5)
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(UnsupportedOpError, match="scatter.*div"):
        run_mil(lambda d, u: mb.scatter(data=d, indices=np.array([0, 1], np.int32), updates=u, mode="div"),
                {"d": data, "u": upd}, tmp_path)


@pytest.mark.parametrize("begin,end,stride,squeeze", [
    ([1, 0, 2], [3, 4, 5], [1, 2, 1], [False, False, False]),
    ([2, 3, 0], [3, 0, 5], [1, -1, 2], [True, False, False]),
])
def test_slice_update(begin, end, stride, squeeze, tmp_path):
    x = rand(4, 5, 6)
    idx = tuple(b if sq else slice(b, e, s) for b, e, s, sq in zip(begin, end, stride, squeeze))
    update = rand(*x[idx].shape)
    kw = dict(begin=np.array(begin, np.int32), end=np.array(end, np.int32), stride=np.array(stride, np.int32),
              squeeze_mask=np.array(squeeze))
    outs = run_mil(lambda x, u, b: (mb.slice_update(x=x, update=u, **kw),
                                    mb.slice_update(x=x, update=u, **{**kw, "begin": b})),  # run-time begin
                   {"x": x, "u": update, "b": np.array(begin, np.int32)}, tmp_path, target="iOS18")
    ref = x.copy()
    ref[idx] = update
    close(outs[0], ref)
    close(outs[1], ref)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_one_hot(axis, tmp_path):
    ind = np.array([[1, 0, 3], [2, 5, -1]], np.int32)  # 5 and -1: out of range, all off

    def build(i, n):
        return (mb.one_hot(indices=i, one_hot_vector_size=4, axis=axis, on_value=2.5, off_value=-1.0),
                mb.one_hot(indices=i, one_hot_vector_size=mb.squeeze(x=n), axis=axis))  # run-time depth

    outs = run_mil(build, {"i": ind, "n": np.array([4], np.int32)}, tmp_path)
    hot = ind[..., None] == np.arange(4)
    close(outs[0], np.moveaxis(np.where(hot, 2.5, -1.0), -1, axis))
    np.testing.assert_array_equal(outs[1], np.moveaxis(hot.astype(np.int32), -1, axis))


@pytest.mark.parametrize("batch_dims", [1, 2])
def test_gather_nd_batch_dims(batch_dims, tmp_path):
    x = rand(2, 3, 4, 5)
    k = 2 if batch_dims == 1 else 1
    bshape = x.shape[:batch_dims]
    ishape = bshape + (6, k)
    idx = np.stack([rng.integers(-x.shape[batch_dims + j], x.shape[batch_dims + j], size=ishape[:-1])
                    for j in range(k)], -1).astype(np.int32)
    out = run_mil(lambda x, i: mb.gather_nd(x=x, indices=i, batch_dims=batch_dims), {"x": x, "i": idx},
                  tmp_path, target="iOS16")[0]
    ref = np.stack([x[b][tuple(idx[b][..., j] for j in range(k))] for b in np.ndindex(*bshape)])
    close(out, ref.reshape(idx.shape[:-1] + x.shape[batch_dims + k:]))


@pytest.mark.parametrize("seq_axis,batch_axis", [(1, 0), (0, 2)])
def test_reverse_sequence(seq_axis, batch_axis, tmp_path):
    x = rand(4, 5, 3)
    lengths = rng.integers(0, x.shape[seq_axis] + 1, size=x.shape[batch_axis]).astype(np.int32)
    out = run_mil(lambda x, n: mb.reverse_sequence(x=x, lengths=n, seq_axis=seq_axis, batch_axis=batch_axis),
                  {"x": x, "n": lengths}, tmp_path)[0]
    ref = np.moveaxis(x.copy(), (batch_axis, seq_axis), (0, 1))
    for b, n in enumerate(lengths):
        ref[b, :n] = ref[b, :n][::-1].copy()
    close(out, np.moveaxis(ref, (0, 1), (batch_axis, seq_axis)))


def test_local_response_norm_matches_coremltools_expectations(tmp_path):
    x = np.array([[[1.0, -7.0], [5.0, -6.0], [-3.0, -5.0]]], np.float32)
    outs = run_mil(lambda x: (mb.local_response_norm(x=x, size=2),
                              mb.local_response_norm(x=x, size=3, alpha=0.0001, beta=0.75, k=1.0)), {"x": x}, tmp_path)
    close(outs[0], [[[0.99996257, -6.98716545], [4.99531746, -5.99191284], [-2.99898791, -4.99531746]]], 1e-6)
    close(outs[1], [[[0.99997497, -6.99143696], [4.99687672, -5.99460602], [-2.99932504, -4.99687672]]], 1e-6)


@pytest.mark.parametrize("size", [2, 5])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (6, 3, 4)])
def test_local_response_norm_numpy(size, shape, tmp_path):
    # Window over axis -3: size // 2 before, (size - 1) // 2 after, zero-padded, alpha / size.
    x = rand(*shape)
    out = run_mil(lambda x: mb.local_response_norm(x=x, size=size, alpha=0.01, beta=0.6, k=2.0), {"x": x}, tmp_path)[0]
    sq = np.pad(x.astype(np.float64) ** 2, [(0, 0)] * (len(shape) - 3) + [(size // 2, (size - 1) // 2), (0, 0), (0, 0)])
    win = sum(sq[..., i:i + 6, :, :] for i in range(size))
    close(out, x / (2.0 + 0.01 / size * win) ** 0.6, 1e-5)


# ---- layout and pooling ----------------------------------------------------------------------

@pytest.mark.parametrize("axis,size,stride", [(1, 2, 1), (-1, 3, 2), (0, 1, 2)])
def test_sliding_windows(axis, size, stride, tmp_path):
    x = rand(4, 5, 7)
    out = run_mil(lambda x: mb.sliding_windows(x=x, axis=axis, size=size, stride=stride), {"x": x}, tmp_path)[0]
    ax = axis % 3
    n = (x.shape[ax] - size) // stride + 1
    wins = [np.take(x, range(i * stride, i * stride + size), axis=ax) for i in range(n)]
    close(out, np.stack(wins, ax))


def test_space_to_batch_and_back_match_coremltools_expectations(tmp_path):
    x = np.arange(1, 17, dtype=np.float32).reshape(2, 1, 2, 4)
    s2b = np.array([[0, 1, 3], [0, 9, 11], [0, 2, 4], [0, 10, 12],
                    [0, 5, 7], [0, 13, 15], [0, 6, 8], [0, 14, 16]], np.float32).reshape(8, 1, 1, 3)
    outs = run_mil(lambda x, y: (mb.space_to_batch(x=x, block_shape=[2, 2], paddings=[[0, 0], [2, 0]]),
                                 mb.batch_to_space(x=y, block_shape=[2, 2], crops=[[0, 0], [2, 0]])),
                   {"x": x, "y": s2b}, tmp_path)
    close(outs[0], s2b)
    close(outs[1], x)


def test_space_to_batch_round_trip_with_padding(tmp_path):
    x = rand(2, 3, 5, 4)
    pads = [[1, 2], [0, 2]]
    outs = run_mil(lambda x: mb.batch_to_space(x=mb.space_to_batch(x=x, block_shape=[2, 3], paddings=pads),
                                               block_shape=[2, 3], crops=pads), {"x": x}, tmp_path)
    close(outs[0], x)


@pytest.mark.parametrize("dims", [1, 2])
def test_l2_pool_matches_coremltools_expectations(dims, tmp_path):
    if dims == 1:
        x = np.arange(1, 8, dtype=np.float32).reshape(1, 1, 7)
        ref = [[[[1.0, 3.0, 5.0, 7.0]]], [[[2.236068, 7.071068, 9.219544]]]]
    else:
        x = np.array([[[[-10.0, -6.0], [-7.0, 9.0]], [[-3.0, 0.0], [11.0, 7.0]]]], np.float32)
        ref = [[[[[11.66190338]], [[3.0]]]], [[[[16.309507], [11.401754]], [[13.379088], [13.038404]]]]]
    kernel, strides = [1, 2, 3], [2, 1, 3]
    outs = run_mil(lambda x: (mb.l2_pool(x=x, kernel_sizes=kernel[:dims], strides=strides[:dims], pad_type="valid"),
                              mb.l2_pool(x=x, kernel_sizes=kernel[-dims:], strides=strides[-dims:], pad_type="same")),
                   {"x": x}, tmp_path)
    for out, r in zip(outs, ref):
        r = np.array(r, np.float32)
        close(out, r, 1e-5)


# ---- resample and affine ---------------------------------------------------------------------

RESAMPLE_CASES = [  # coremltools' TestResample smoke: (kwargs, expected for float coords, for int coords)
    (dict(sampling_mode="bilinear", padding_mode="constant", padding_value=6.17,
          coordinates_mode="normalized_minus_one_to_one", align_corners=True), [8.585, 6.17, 27.5, 6.17], [27.5, 44, 27.5, 44]),
    (dict(sampling_mode="nearest", padding_mode="border", padding_value=-1.0,
          coordinates_mode="unnormalized", align_corners=False), [11, 11, 11, 44], [11, 44, 11, 44]),
    (dict(sampling_mode="bilinear", padding_mode="reflection", padding_value=-1.0,
          coordinates_mode="normalized_zero_to_one", align_corners=True), [22, 36.3, 11, 34.1], [11, 44, 11, 44]),
    (dict(sampling_mode="nearest", padding_mode="symmetric", padding_value=-1.0,
          coordinates_mode="normalized_zero_to_one", align_corners=False), [22, 33, 11, 33], [11, 44, 11, 44]),
]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("int_coords", [False, True])
def test_resample_matches_coremltools_expectations(case, int_coords, tmp_path):
    kwargs, ref_f, ref_i = RESAMPLE_CASES[case]
    x = np.array([11.0, 22.0, 33.0, 44.0], np.float32).reshape(1, 1, 2, 2)
    coords = np.array([-1.0, -2.0, -3.7, -1.0, 0.0, 0.0, 3.5, 1.2], np.float32).reshape(1, 2, 2, 2)
    if int_coords:
        coords = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int32).reshape(1, 2, 2, 2)
    out = run_mil(lambda x, c: mb.resample(x=x, coordinates=c, **kwargs), {"x": x, "c": coords}, tmp_path)[0]
    close(out, np.array(ref_i if int_coords else ref_f, np.float32).reshape(1, 1, 2, 2), 1e-4)


@pytest.mark.parametrize("padding,torch_padding", [("constant", "zeros"), ("border", "border")])
@pytest.mark.parametrize("align", [True, False])
def test_resample_bilinear_matches_grid_sample(padding, torch_padding, align, tmp_path):
    import torch
    import torch.nn.functional as F

    x, coords = rand(2, 3, 5, 7), rand(2, 4, 6, 2, lo=-1.3, hi=1.3)
    out = run_mil(lambda x, c: mb.resample(x=x, coordinates=c, sampling_mode="bilinear", padding_mode=padding,
                                           padding_value=0.0, coordinates_mode="normalized_minus_one_to_one",
                                           align_corners=align), {"x": x, "c": coords}, tmp_path)[0]
    ref = F.grid_sample(torch.from_numpy(x), torch.from_numpy(coords), "bilinear", torch_padding, align)
    close(out, ref.numpy(), 1e-5)


def test_affine_matches_coremltools_expectations(tmp_path):
    x = np.array([11.0, 22.0, 33.0, 44.0], np.float32).reshape(1, 1, 2, 2)
    m = np.array([-1.0, -2.0, -3.7, -1.0, 3.5, 1.2], np.float32).reshape(1, 6)
    kw = dict(sampling_mode="bilinear", padding_mode="constant", padding_value=0.0,
              coordinates_mode="normalized_minus_one_to_one", align_corners=True)
    outs = run_mil(lambda x, m: (mb.affine(x=x, transform_matrix=m, output_height=3, output_width=3, **kw),
                                 mb.affine(x=x, transform_matrix=m, output_height=2, output_width=5, **kw)),
                   {"x": x, "m": m}, tmp_path)
    close(outs[0], np.array([10.752501, 2.5025, 0, 1.9799997, 0, 0, 0, 0, 0], np.float32).reshape(1, 1, 3, 3), 1e-5)
    close(outs[1], np.array([10.752501, 5.94, 2.5025, 0.44000006] + [0] * 6, np.float32).reshape(1, 1, 2, 5), 1e-5)


def test_affine_per_batch_matrices_match_affine_grid(tmp_path):
    import torch
    import torch.nn.functional as F

    x, m = rand(2, 3, 6, 5), rand(2, 6, lo=-1, hi=1)
    out = run_mil(lambda x, m: mb.affine(x=x, transform_matrix=m, output_height=4, output_width=7,
                                         sampling_mode="bilinear", padding_mode="constant", padding_value=0.0,
                                         coordinates_mode="normalized_minus_one_to_one", align_corners=True),
                  {"x": x, "m": m}, tmp_path)[0]
    theta = torch.from_numpy(m).reshape(2, 2, 3)
    grid = F.affine_grid(theta, (2, 3, 4, 7), align_corners=True)
    close(out, F.grid_sample(torch.from_numpy(x), grid, "bilinear", "zeros", True).numpy(), 1e-5)


# ---- iOS17 resize ----------------------------------------------------------------------------

def test_resize_matches_coremltools_expectations(tmp_path):
    x5 = np.array([-6.174, 9.371], np.float32).reshape(1, 1, 1, 2, 1)
    x3 = np.array([0, 1], np.float32).reshape(1, 1, 2)
    outs = run_mil(lambda a, b: (mb.resize(x=a, shape=[1, 1, 3, 2], resized_dims=np.uint32(2),
                                           interpolation_mode="NEAREST_NEIGHBOR"),
                                 mb.resize(x=b, shape=[1, 1, 5], resized_dims=np.uint32(2), interpolation_mode="LINEAR")),
                   {"a": x5, "b": x3}, tmp_path)
    close(outs[0], np.array([-6.174, -6.174, 9.371, 9.371, 9.371, 9.371], np.float32).reshape(1, 1, 1, 3, 2))
    close(outs[1], np.array([0, 0.4, 0.8, 1, 1], np.float32).reshape(1, 1, 5))


def test_resize_linear_to_a_run_time_shape(tmp_path):
    import torch
    import torch.nn.functional as F

    x = rand(1, 2, 3, 4)

    def build(x, s):
        shape = mb.add(x=s, y=np.array([0, 0], np.int32))  # computed at run time
        return (mb.resize(x=x, shape=shape, resized_dims=np.uint32(2), sampling_mode="ALIGN_CORNERS"),
                mb.resize(x=x, shape=shape, resized_dims=np.uint32(1), sampling_mode="UNALIGN_CORNERS"))

    outs = run_mil(build, {"x": x, "s": np.array([5, 7], np.int32)}, tmp_path)
    t = torch.from_numpy(x)
    close(outs[0], F.interpolate(t, size=(5, 7), mode="bilinear", align_corners=True).numpy())
    close(outs[1], F.interpolate(t, size=(3, 7), mode="bilinear", align_corners=False).numpy())  # last axis only


def test_resize_nearest_where_core_ml_positions_are_unknown_is_refused(tmp_path):
    from python_coreml_sd.runtime.mil.plan import UnsupportedOpError

    x = rand(1, 1, 4, 4)
    with pytest.raises(UnsupportedOpError, match="resize.*4 -> 3"):
        run_mil(lambda x: mb.resize(x=x, shape=[3, 3], resized_dims=np.uint32(2), interpolation_mode="NEAREST_NEIGHBOR"),
                {"x": x}, tmp_path)


# ---- crop_resize -----------------------------------------------------------------------------

X16 = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
CROP_IOS15 = [  # coremltools' TestCropResize smoke (iOS15 roi): (roi, target, normalized, expected)
    ([1, 1, 2, 2], 2, False, [6, 7, 10, 11]),
    ([1, 1, 2, 2], 4, False, [6, 6.333333, 6.66666, 7, 7.333333, 7.666666, 8, 8.333333,
                              8.666666, 9, 9.3333333, 9.666666, 10, 10.333333, 10.666666, 11]),
    ([1, 1, 2, 2], 1, False, [8.5]),
    ([0, 0.0, 0.0, 1.0 / 3, 1.0 / 3], 2, True, [1, 2, 5, 6]),
    ([2, 2, 1, 1], 2, False, [11, 10, 7, 6]),
]


@pytest.mark.parametrize("case", range(5))
def test_crop_resize_ios15_matches_coremltools_expectations(case, tmp_path):
    roi, t, normalized, ref = CROP_IOS15[case]
    roi = np.array(roi, np.float32).reshape(1, 1, -1, 1, 1)
    out = run_mil(lambda x: mb.crop_resize(x=x, roi=roi, target_height=t, target_width=t, normalized_coordinates=normalized,
                                           box_coordinate_mode="CORNERS_HEIGHT_FIRST", sampling_mode="ALIGN_CORNERS"),
                  {"x": X16}, tmp_path, target="iOS15")[0]
    close(out, np.array(ref, np.float32).reshape(1, 1, 1, t, t), 1e-5)


BOXES3 = np.array([[0.1, 0.3, 1.3, 1.0], [0.5, 1.8, 1.0, 0.3], [0.0, 0.4, 0.6, 0.7]], np.float32)


def crop_ref(pad):
    return np.array([3.1, 5.2, pad, pad, pad, 7.899, pad, 13.9, 2.2, 3.1, 9.4, 10.3], np.float32)


@pytest.mark.parametrize("pad", [0.0, 10.0])
def test_crop_resize_ios16_pad_value_and_ios17_boxes(pad, tmp_path):
    roi = np.concatenate([np.zeros((3, 1), np.float32), BOXES3], 1).reshape(3, 1, 5, 1, 1)
    kw = dict(target_height=2, target_width=2, normalized_coordinates=True, box_coordinate_mode="CORNERS_HEIGHT_FIRST",
              sampling_mode="ALIGN_CORNERS", pad_value=pad)
    out16 = run_mil(lambda x: mb.crop_resize(x=x, roi=roi, **kw), {"x": X16}, tmp_path, target="iOS16")[0]
    close(out16, crop_ref(pad).reshape(3, 1, 1, 2, 2), 1e-3)
    out17 = run_mil(lambda x: mb.crop_resize(x=x, boxes=BOXES3, box_indices=np.zeros(3, np.int32), **kw),
                    {"x": X16}, tmp_path, target="iOS17")[0]
    close(out17, crop_ref(pad).reshape(3, 1, 2, 2), 1e-3)


def test_crop_resize_boxes_pick_their_image_and_crop_every_image_with_4_coordinates(tmp_path):
    x = rand(2, 3, 5, 6)
    boxes = np.array([[0, 1, 3, 4], [1, 0, 4, 2]], np.float32)
    kw = dict(target_height=3, target_width=4, box_coordinate_mode="CORNERS_HEIGHT_FIRST", sampling_mode="ALIGN_CORNERS")

    def ref_crop(img, b):  # bilinear at linspace positions, all inside the image here
        ys, xs = np.linspace(b[0], b[2], 3), np.linspace(b[1], b[3], 4)
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, 4), np.minimum(x0 + 1, 5)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        g = lambda yy, xx: img[:, yy][:, :, xx]  # noqa: E731
        return (g(y0, x0) * (1 - fx) + g(y0, x1) * fx) * (1 - fy) + (g(y1, x0) * (1 - fx) + g(y1, x1) * fx) * fy

    out17 = run_mil(lambda x: mb.crop_resize(x=x, boxes=boxes, box_indices=np.array([1, 0], np.int32), **kw),
                    {"x": x}, tmp_path, target="iOS17")[0]
    close(out17, np.stack([ref_crop(x[1], boxes[0]), ref_crop(x[0], boxes[1])]))
    roi = boxes.reshape(2, 1, 4, 1, 1)
    out15 = run_mil(lambda x: mb.crop_resize(x=x, roi=roi, **kw), {"x": x}, tmp_path, target="iOS15")[0]
    close(out15, np.stack([np.stack([ref_crop(x[i], b) for i in range(2)]) for b in boxes]))


@pytest.mark.parametrize("bad", [-1, 3])
def test_scatter_validate_indices_refuses_out_of_bounds_at_run_time(tmp_path, bad):
    from python_coreml_sd.errors import UserError

    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    updates = np.array([5.0, 10.0], np.float32)

    def build(data, indices, updates):
        return mb.scatter_nd(data=data, indices=indices, updates=updates, validate_indices=True, mode="update")

    good = np.array([[1, 0], [0, 2]], np.int32)
    (out,) = run_mil(build, {"data": data, "indices": good, "updates": updates}, tmp_path)
    want = data.copy()
    want[1, 0], want[0, 2] = 5, 10
    np.testing.assert_array_equal(out, want)
    with pytest.raises(UserError, match="index is out of bounds and the program sets validate_indices"):
        run_mil(build, {"data": data, "indices": np.array([[1, 0], [0, bad]], np.int32), "updates": updates}, tmp_path)
