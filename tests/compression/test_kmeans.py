"""The 1-D k-means: exact on hand-checkable inputs, optimal on tiny ones, never worse than sklearn."""
import itertools

import numpy as np
import pytest

from python_coreml_sd.compression.kmeans import (Histogram, assign, exact_kmeans_sorted, kmeans_1d, kmeans_sorted,
                                                 pack_bits, palettize_array, sse)


def brute_force_sse(x, w, k):
    """Minimum SSE over every split of the sorted values into k contiguous runs (1-D optimum)."""
    order = np.argsort(x)
    x, w = x[order], w[order]
    best = np.inf
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        total = 0.0
        for lo, hi in zip((0,) + cuts, cuts + (len(x),)):
            c = np.average(x[lo:hi], weights=w[lo:hi])
            total += np.sum(w[lo:hi] * (x[lo:hi] - c) ** 2)
        best = min(best, total)
    return best


@pytest.mark.parametrize(
    "values, weights, k, expected",
    [
        ([0, 0, 1, 1, 10, 10], None, 2, [0.5, 10]),
        ([1, 2, 3, 10, 11, 12], None, 2, [2, 11]),
        ([0, 1, 3, 10, 11, 12], None, 3, [0.5, 3, 11]),  # SSE 0.5 + 0 + 2 beats splitting {10,11,12}
        ([0, 1, 5], [1, 1, 2], 2, [0.5, 5]),  # {0,1},{5}: SSE 0.5 beats {0},{1,5,5}: SSE 10.67
        ([3, -1, 7], None, 5, [-1, 3, 7]),  # fewer distinct values than k: each is its own centroid
        ([2.5, 2.5, 2.5], None, 4, [2.5]),
        ([-4, -2, 2, 4], None, 1, [0]),
    ],
)
def test_hand_checkable(values, weights, k, expected):
    centroids, labels = kmeans_1d(values, k, weights)
    np.testing.assert_allclose(centroids, expected)
    nearest = np.asarray(expected)[assign(np.asarray(values, float), np.asarray(expected, float))]
    np.testing.assert_allclose(np.asarray(centroids)[labels], nearest)


def test_tied_optima_give_the_optimal_cost():
    # {1},{2,3} and {1,2},{3} tie (SSE 0.5 each side); either is optimal, total 0.5 + 2.
    assert sse([1, 2, 3, 10, 11, 12], kmeans_1d([1, 2, 3, 10, 11, 12], 3)[0]) == pytest.approx(2.5)


@pytest.mark.parametrize("seed", range(12))
def test_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 10))
    k = int(rng.integers(1, min(n, 5) + 1))
    x = np.round(rng.normal(size=n) * 4, 1)  # rounding makes duplicate values likely
    w = rng.integers(1, 5, size=n).astype(float)
    centroids, _ = kmeans_1d(x, k, w)
    assert len(centroids) <= k
    assert sse(x, centroids, w) == pytest.approx(brute_force_sse(x, w, k), rel=1e-9, abs=1e-12)


def test_coarse_path_optimal_on_well_separated_clusters():
    # 3 tight clumps of 400 distinct values each: above the exact limit, so the atom DP + Lloyd runs.
    rng = np.random.default_rng(0)
    x = np.concatenate([c + rng.uniform(-0.01, 0.01, 400) for c in (-5.0, 0.0, 5.0)])
    centroids, labels = kmeans_1d(x, 3)
    np.testing.assert_allclose(centroids, [x[:400].mean(), x[400:800].mean(), x[800:].mean()])
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 400))


@pytest.mark.parametrize("kind, shape, nbits", [
    ("uniform", (320, 320), 6),  # SD 1.5's random init: a flat landscape, optimum up to ~1.4 gaps from Lloyd's
    ("uniform", (1280, 90), 6),
    ("laplace", (320, 320), 6),
    ("outliers", (96, 64), 8),  # 256 clusters on 4,540 values: the coarse DP needs ~8 atoms per cluster
])
def test_matches_the_exact_optimum(kind, shape, nbits):
    rng = np.random.default_rng(len(kind) + shape[1])
    hist = Histogram(random_weight(rng, kind, shape))
    ours = kmeans_sorted(hist.values, hist.counts, 1 << nbits)
    exact = exact_kmeans_sorted(hist.values, hist.counts, 1 << nbits)
    assert sse(hist.values, ours, hist.counts) == pytest.approx(sse(hist.values, exact, hist.counts), rel=1e-12)


def sklearn_mse(w, nbits):
    """coremltools' own k-means LUT (scikit-learn), scored as coremltools stores it: fp16 LUT."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    lut, labels = _get_kmeans_lookup_table_and_weight(nbits, w)
    dense = lut.reshape(-1).astype(w.dtype)[labels].astype(np.float64)
    return np.mean((dense - w.reshape(-1)) ** 2)


def random_weight(rng, kind, shape):
    draw = {"normal": lambda: rng.normal(0, 0.02, shape), "uniform": lambda: rng.uniform(-0.05, 0.05, shape),
            "laplace": lambda: rng.laplace(0, 0.01, shape), "outliers": lambda: np.concatenate(
                [rng.normal(0, 0.01, shape[0] * shape[1] - 8), rng.normal(0, 0.5, 8)]).reshape(shape)}
    return draw[kind]().astype(np.float16)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("kind", ["normal", "uniform", "laplace", "outliers"])
def test_no_worse_than_coremltools_kmeans(nbits, kind):
    rng = np.random.default_rng(nbits * 7 + len(kind))
    w = random_weight(rng, kind, (96, 64) if nbits == 8 else (160, 128))
    lut, indices = palettize_array(w, nbits)
    ours = np.mean((lut[indices].astype(np.float64) - w) ** 2)
    assert ours <= sklearn_mse(w, nbits)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_palettize_array_contract(nbits):
    rng = np.random.default_rng(nbits)
    w = rng.normal(0, 0.02, (64, 48, 3)).astype(np.float16)
    lut, indices = palettize_array(w, nbits)
    assert lut.shape == (1 << nbits,) and lut.dtype == np.float16
    assert indices.shape == w.shape and indices.dtype == np.uint8 and indices.max() < (1 << nbits)
    # Each element uses its nearest LUT entry (the stored fp16 one), never a farther one.
    dist = np.abs(w.astype(np.float64)[..., None] - lut.astype(np.float64))
    used = np.take_along_axis(dist, indices[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_array_equal(used, dist.min(-1))
    again = palettize_array(w.copy(), nbits)
    np.testing.assert_array_equal(again[0], lut)
    np.testing.assert_array_equal(again[1], indices)


@pytest.mark.cuda
@pytest.mark.parametrize("nbits", [2, 6])
def test_cuda_histogram_and_gather_match_the_cpu(nbits):
    rng = np.random.default_rng(nbits)
    w = np.concatenate([rng.normal(0, 0.02, 3_000_000), [0.0, -0.0, 65504.0, -65504.0]]).astype(np.float16)
    lut_cpu, idx_cpu = palettize_array(w, nbits)
    lut_gpu, idx_gpu = palettize_array(w, nbits, device="cuda")
    np.testing.assert_array_equal(lut_gpu, lut_cpu)
    np.testing.assert_array_equal(idx_gpu, idx_cpu)
    with pytest.raises(ValueError, match="NaN or infinite"):
        palettize_array(np.array([1.0, np.inf], dtype=np.float16), nbits, device="cuda")


def test_lattice_weights_are_reproduced_exactly():
    w = np.array([0.5, -0.25, 0.5, 0.125, -0.25] * 1000, dtype=np.float16)
    lut, indices = palettize_array(w, 2)
    np.testing.assert_array_equal(lut[indices], w)


def test_fp32_input_uses_the_generic_path():
    rng = np.random.default_rng(3)
    w = rng.normal(size=5000).astype(np.float32)
    lut, indices = palettize_array(w, 4)
    assert lut.dtype == np.float32 and len(np.unique(lut)) == 16
    assert np.mean((lut[indices] - w) ** 2) < np.var(w) / 50


def test_rejects_bad_input():
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            palettize_array(np.array([1.0, bad], dtype=np.float16), 2)
        with pytest.raises(ValueError, match="NaN or infinite"):
            palettize_array(np.array([1.0, bad], dtype=np.float32), 2)
    with pytest.raises(ValueError):
        palettize_array(np.ones(10, dtype=np.float16), 5)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("length", [1, 3, 7, 8, 25, 4099])
def test_pack_bits_gives_coremltools_bytes(nbits, length):
    from coremltools.optimize._utils import pack_elements_into_bits

    elements = np.random.default_rng(length).integers(0, 1 << nbits, length).astype(np.uint8)
    expected = pack_elements_into_bits(elements, nbits)
    packed = pack_bits(elements, nbits)
    assert packed.dtype == np.uint8 and packed.shape == expected.shape
    assert packed.tobytes() == expected.tobytes()
