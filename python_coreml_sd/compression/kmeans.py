"""Fast, deterministic 1-D k-means for weight palettization.

Why it is fast: an fp16 tensor has at most 65,536 distinct values, so we cluster the sorted distinct
values weighted by their counts (n <= 65,536 however big the tensor is). In one dimension every
optimal cluster is a contiguous run of the sorted values, so a clustering is a list of k-1 cut
points, and the exact cost of any run comes from three prefix sums (count, sum, sum of squares).

- Small problems (n distinct values <= ``exact_limit``): exact dynamic programming over cut points;
  the result is the global optimum.
- Larger ones: the same exact DP over ``m`` coarse "atoms" (runs of values, cut at weighted
  quantiles and at even steps of the value range so both the mass and the tails get resolution),
  then Lloyd iterations on the full distinct values. A Lloyd step in the sorted domain is a
  ``searchsorted`` of the k-1 midpoints plus prefix-sum lookups: O(k log n), independent of the
  tensor size, so we iterate to an exact fixed point.

No randomness anywhere, so results are reproducible bit for bit.
"""
from __future__ import annotations

import numpy as np

SUPPORTED_NBITS = (1, 2, 3, 4, 6, 8)
# Distinct values up to which the DP runs on every value (exact); above it, on coarse atoms.
EXACT_LIMIT = 512
MAX_LLOYD_ITERS = 300
# Atoms for the coarse DP above the exact limit: finer finds better basins, cost grows as m^2 k.
COARSE_ATOMS = 512
KMEANSPP_STARTS = 1
# How far (in distinct values) the windowed DP may move each cut per pass.
WINDOW_RADIUS = 32
FAR_CANDIDATES = 64


def kmeans_1d(values, k: int, weights=None, exact_limit: int = EXACT_LIMIT):
    """Weighted 1-D k-means. Returns (centroids ascending, labels for ``values``).

    At most ``k`` centroids: fewer when there are fewer distinct values.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    _check_inputs(x, w, k)
    distinct, inverse = np.unique(x, return_inverse=True)
    mass = np.bincount(inverse.ravel(), weights=w, minlength=len(distinct))
    centroids = kmeans_sorted(distinct, mass, k, exact_limit)
    return centroids, assign(x, centroids)


def kmeans_sorted(xs: np.ndarray, ws: np.ndarray, k: int, exact_limit: int = EXACT_LIMIT) -> np.ndarray:
    """Centroids (ascending) for ascending values ``xs`` with positive weights ``ws``."""
    distinct = np.unique(xs)
    if len(distinct) <= k:
        return distinct
    # Centering keeps the sum-of-squares prefix sums well conditioned.
    shift = float(np.average(xs, weights=ws))
    prefix = _prefix_sums(xs - shift, ws)
    edges = _atom_edges(xs - shift, prefix[0], k, exact_limit)
    cuts = _optimal_cuts(prefix, edges, k)
    if len(edges) == len(xs) + 1:
        return _means(prefix, cuts) + shift
    # The k-means cost has many near-equal basins; keep the best of a few distinct starts.
    starts = [cuts] + [_kmeanspp_cuts(xs - shift, ws, k, seed) for seed in range(KMEANSPP_STARTS)]
    best = min((_refine(xs - shift, prefix, c) for c in starts), key=lambda c: sse(xs - shift, c, ws))
    return best + shift


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ties go to the lower one)."""
    if len(centroids) == 1:
        return np.zeros(x.shape, dtype=np.int64)
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mids, x, side="left")


def sse(x, centroids, weights=None) -> float:
    """Weighted sum of squared distances of ``x`` to their nearest centroid."""
    x = np.asarray(x, dtype=np.float64).ravel()
    c = np.sort(np.asarray(centroids, dtype=np.float64))
    d = x - c[assign(x, c)]
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    return float(np.sum(w * d * d))


def _check_inputs(x, w, k):
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if x.size == 0:
        raise ValueError("k-means needs at least one value")
    if x.shape != w.shape:
        raise ValueError(f"values ({x.size}) and weights ({w.size}) differ in length")
    if not np.all(np.isfinite(x)):
        raise ValueError("k-means got NaN or infinite values")
    if np.any(w <= 0):
        raise ValueError("k-means weights must be positive")


def _prefix_sums(xs, ws):
    """(count, sum, sum of squares) prefix sums, each with a leading 0."""
    out = []
    for term in (ws, ws * xs, ws * xs * xs):
        out.append(np.concatenate(([0.0], np.cumsum(term))))
    return out


def _atom_edges(xs, p0, k, exact_limit):
    """Indices into ``xs`` where atoms start (plus n): every value when small, else coarse runs."""
    n = len(xs)
    if n <= exact_limit:
        return np.arange(n + 1)
    m = min(max(COARSE_ATOMS, 4 * k), 2 * k + COARSE_ATOMS // 2)
    by_mass = np.searchsorted(p0[1:], np.linspace(0, p0[-1], m // 2 + 1)[1:-1], side="right")
    by_value = np.searchsorted(xs, np.linspace(xs[0], xs[-1], m // 2 + 1)[1:-1], side="left")
    # Even steps in rank guarantee enough distinct atoms when mass and range both bunch up.
    by_rank = np.linspace(0, n, m // 4 + 1).astype(np.int64)
    edges = np.unique(np.concatenate(([0, n], by_mass + 1, by_value, by_rank)))
    return edges[(edges >= 0) & (edges <= n)]


def _run_cost_matrix(prefix, edges):
    """cost[i, t] = SSE of the run from atom t up to atom i (exclusive); inf where t >= i.

    Indexed [end, start] so the DP's min over starts runs along contiguous memory.
    """
    p0, p1, p2 = (p[edges] for p in prefix)
    s0 = p0[:, None] - p0[None, :]
    s1 = p1[:, None] - p1[None, :]
    s2 = p2[:, None] - p2[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.maximum(s2 - s1 * s1 / s0, 0.0)
    cost[np.triu_indices(len(edges))] = np.inf
    return cost


def _optimal_cuts(prefix, edges, k):
    """Exact DP over atoms: the k-run partition of minimum SSE, as indices into the values.

    best[i] = min cost of covering atoms [0, i) with j+1 runs; one vectorised min per j, over the
    band of (end, start) pairs that can still lead to a full k-run partition.
    """
    cost = _run_cost_matrix(prefix, edges)
    m = len(edges) - 1
    if m > EXACT_LIMIT:
        # Coarse atoms only steer the refinement that follows, so float32 (half the memory
        # traffic of this memory-bound loop) is precise enough here.
        cost = (cost / max(float(cost[np.isfinite(cost)].max()), 1e-300)).astype(np.float32)
    k = min(k, m)
    best = cost[:, 0].copy()
    back = np.zeros((k, m + 1), dtype=np.int64)
    for j in range(1, k):
        lo, hi = j + 1, m - (k - 1 - j)
        total = cost[lo : hi + 1, j:hi] + best[None, j:hi]
        arg = np.argmin(total, axis=1)
        back[j, lo : hi + 1] = arg + j
        new_best = np.full(m + 1, np.inf, dtype=cost.dtype)
        new_best[lo : hi + 1] = total[np.arange(len(arg)), arg]
        best = new_best
    cuts = [m]
    for j in range(k - 1, 0, -1):
        cuts.append(back[j][cuts[-1]])
    cuts.append(0)
    return edges[np.array(cuts[::-1])]


def _means(prefix, cuts):
    p0, p1, _ = prefix
    return (p1[cuts[1:]] - p1[cuts[:-1]]) / (p0[cuts[1:]] - p0[cuts[:-1]])


def _kmeanspp_cuts(xs, ws, k, seed):
    """Cuts from a k-means++ seeding (greedy, as scikit-learn does it) with a fixed seed."""
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k))
    centers = [xs[rng.choice(len(xs), p=ws / ws.sum())]]
    d2 = (xs - centers[0]) ** 2
    for _ in range(1, k):
        pot = ws * d2
        cand = np.searchsorted(np.cumsum(pot), rng.random(trials) * pot.sum())
        cand = np.minimum(cand, len(xs) - 1)
        new_d2 = np.minimum(d2[None, :], (xs[None, :] - xs[cand][:, None]) ** 2)
        pick = int(np.argmin((new_d2 * ws).sum(axis=1)))
        centers.append(xs[cand[pick]])
        d2 = new_d2[pick]
    return _cuts_for(xs, np.unique(centers))


def _refine(xs, prefix, cuts):
    """Local search from the coarse optimum until no move helps.

    Alternates Lloyd steps (cheap, O(k log n)), exact re-splits of adjacent pairs, and a DP that
    moves every cut at once within a window of its current position at full resolution.
    """
    centroids = _means(prefix, cuts)
    for _ in range(MAX_LLOYD_ITERS):
        centroids = _cell_means(prefix, cuts, centroids)
        moved = _cuts_for(xs, centroids)
        if np.array_equal(moved, cuts):
            moved = _resplit_pairs(prefix, cuts)
        if np.array_equal(moved, cuts):
            moved = _windowed_dp(prefix, cuts)
        if np.array_equal(moved, cuts):
            break
        cuts = moved
    return _cell_means(prefix, cuts, centroids)


def _windowed_dp(prefix, cuts, radius: int = WINDOW_RADIUS):
    """Exact DP over cut positions restricted to +-radius values around each current cut.

    Returns the old cuts unless the new partition is strictly cheaper.
    """
    n = len(prefix[0]) - 1
    inner = cuts[1:-1]
    if len(inner) == 0:
        return cuts
    near = inner[:, None] + np.arange(-radius, radius + 1)[None, :]
    # fp16 values crowd near zero, so +-radius values can be a tiny move there; also offer cuts
    # spread evenly over the span of the two runs each cut separates.
    frac = np.linspace(0.0, 1.0, FAR_CANDIDATES)[None, :]
    far = (cuts[:-2, None] + frac * (cuts[2:, None] - cuts[:-2, None])).astype(np.int64)
    win = np.clip(np.sort(np.concatenate([near, far], axis=1), axis=1), 1, n - 1)
    best = _run_cost(prefix, np.zeros_like(win[0]), win[0])
    back = []
    for j in range(1, len(inner)):
        t, e = win[j - 1][None, :], win[j][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            total = np.where(t < e, best[None, :] + _run_cost(prefix, t, e), np.inf)
        arg = np.argmin(total, axis=1)
        back.append(arg)
        best = total[np.arange(len(arg)), arg]
    with np.errstate(divide="ignore", invalid="ignore"):
        best = np.where(win[-1] < n, best + _run_cost(prefix, win[-1], np.full_like(win[-1], n)), np.inf)
    pos = int(np.argmin(best))
    new_inner = [win[-1][pos]]
    for j in range(len(inner) - 1, 0, -1):
        pos = back[j - 1][pos]
        new_inner.append(win[j - 1][pos])
    new = np.concatenate(([0], new_inner[::-1], [n]))
    old_cost = _partition_cost(prefix, cuts)
    if best.min() < old_cost - 1e-12 * old_cost:
        return new
    return cuts


def _cuts_for(xs, centroids):
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.concatenate(([0], np.searchsorted(xs, mids, side="right"), [len(xs)]))


def _cell_means(prefix, cuts, fallback):
    """Mean of each cell; an empty cell keeps its old centroid (harmless, keeps the order)."""
    p0, p1, _ = prefix
    mass = p0[cuts[1:]] - p0[cuts[:-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mass > 0, (p1[cuts[1:]] - p1[cuts[:-1]]) / mass, fallback)


def _run_cost(prefix, lo, hi):
    """SSE of runs [lo, hi); callers guarantee lo < hi (hot path: no guards)."""
    p0, p1, p2 = prefix
    s1 = p1[hi] - p1[lo]
    return p2[hi] - p2[lo] - s1 * s1 / (p0[hi] - p0[lo])


def _cost_or_zero(prefix, lo, hi):
    """SSE of runs [lo, hi), 0 for empty ones."""
    full = hi > lo
    out = np.zeros(len(lo))
    out[full] = _run_cost(prefix, lo[full], hi[full])
    return out


def _partition_cost(prefix, cuts):
    return float(_cost_or_zero(prefix, cuts[:-1], cuts[1:]).sum())


def _resplit_pairs(prefix, cuts):
    """Best cut inside each adjacent pair of runs, even pairs then odd ones (they don't overlap).

    All candidate cuts of all pairs are scored in one vectorised pass: O(n) per sweep.
    """
    cuts = cuts.copy()
    for parity in (0, 1):
        j = np.arange(parity, len(cuts) - 2, 2)
        if len(j) == 0:
            continue
        lo, hi = cuts[j], cuts[j + 2]
        span = np.maximum(hi - lo - 1, 0)  # candidate cuts strictly inside keep both runs non-empty
        keep = span > 0
        j, lo, hi, span = j[keep], lo[keep], hi[keep], span[keep]
        if len(j) == 0:
            continue
        owner = np.repeat(np.arange(len(j)), span)
        cand = lo[owner] + 1 + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
        score = _run_cost(prefix, lo[owner], cand) + _run_cost(prefix, cand, hi[owner])
        starts = np.cumsum(span) - span
        best = np.minimum.reduceat(score, starts)
        current = _cost_or_zero(prefix, lo, cuts[j + 1]) + _cost_or_zero(prefix, cuts[j + 1], hi)
        first = np.flatnonzero(score == best[owner])
        pick = cand[first[np.unique(owner[first], return_index=True)[1]]]
        # Move only on a clear gain, so rounding noise cannot make the sweep cycle.
        better = best < current - 1e-12 * np.maximum(current, 1e-300)
        cuts[j[better] + 1] = pick[better]
    return cuts


def distinct_with_counts(w: np.ndarray):
    """(sorted distinct values as float64, counts, inverse index per element) for a weight tensor.

    fp16 takes the fast path: a 65,536-bin histogram of the bit patterns, O(size), no sort of the
    tensor itself.
    """
    w = np.asarray(w)
    if w.dtype == np.float16:
        bits = w.reshape(-1).view(np.uint16)
        counts = np.bincount(bits, minlength=1 << 16)
        present = np.flatnonzero(counts)
        values = present.astype(np.uint16).view(np.float16).astype(np.float64)
        order = np.argsort(values, kind="stable")
        rank = np.zeros(1 << 16, dtype=np.int64)
        rank[present[order]] = np.arange(len(present))
        return values[order], counts[present[order]].astype(np.float64), (bits, rank)
    values, inverse, counts = np.unique(w.reshape(-1), return_inverse=True, return_counts=True)
    return values.astype(np.float64), counts.astype(np.float64), (inverse, None)


def palettize_array(w: np.ndarray, nbits: int, exact_limit: int = EXACT_LIMIT):
    """Palettize one tensor: (lut of 2**nbits entries in w's dtype, uint8 indices shaped like w).

    Indices point at the nearest LUT entry *after* rounding the LUT to w's dtype, so the stored
    model dequantizes to the closest palette value. Unused LUT slots repeat the last entry.
    """
    if nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits}")
    w = np.asarray(w)
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot palettize a tensor holding NaN or infinite values")
    values, counts, (codes, rank) = distinct_with_counts(w)
    centroids = kmeans_sorted(values, counts, 1 << nbits, exact_limit)
    lut_values = np.unique(centroids.astype(w.dtype).astype(np.float64))
    labels = assign(values, lut_values).astype(np.uint8)
    # One gather from a small table: the per-element work is O(size) and cache friendly.
    indices = labels[rank][codes] if rank is not None else labels[codes]
    lut = np.full(1 << nbits, lut_values[-1], dtype=w.dtype)
    lut[: len(lut_values)] = lut_values
    return lut, indices.reshape(w.shape)
