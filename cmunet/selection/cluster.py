"""The geometry the strategies share, in numpy: squared distances computed in blocks of rows,
principal components, a seeded k-means (k-means++ start, Lloyd iterations) and typicality."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CELLS = 1 << 24  # numbers in a block of distances (128 MB of float64)


def blocks(n: int, width: int = 1) -> Iterator[slice]:
    """Slices of rows 0..n-1, each of at most 4096 rows and CELLS / width numbers across."""
    size = max(1, min(4096, CELLS // max(width, 1)))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, clipped at 0 (rounding)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def principal_components(x: np.ndarray, dims: int) -> np.ndarray:
    """``x`` centred and projected on its ``dims`` leading principal axes (``x`` itself when it
    has no more columns than that, or ``dims`` is 0). Distances between rows are kept as well as
    ``dims`` axes can keep them; the strategies then cost O(dims) per pair instead of O(D)."""
    if dims == 0 or x.shape[1] <= dims:
        return np.asarray(x, dtype=np.float64)
    mean = x.mean(0, dtype=np.float64)
    scatter = np.zeros((x.shape[1], x.shape[1]))
    for rows in blocks(len(x), x.shape[1]):  # block by block: no float64 copy of x
        centred = x[rows] - mean
        scatter += centred.T @ centred
    _, vectors = np.linalg.eigh(scatter)  # ascending eigenvalues
    axes = vectors[:, ::-1][:, :dims]
    return np.concatenate([(x[rows] - mean) @ axes for rows in blocks(len(x), x.shape[1])])


def nearest_centre(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each row's nearest centre, and the squared distance to it."""
    labels = np.empty(len(x), dtype=np.int64)
    d2 = np.empty(len(x))
    for rows in blocks(len(x), len(centres)):
        block = squared_distances(x[rows], centres)
        labels[rows] = block.argmin(1)
        d2[rows] = block[np.arange(len(block)), labels[rows]]
    return labels, d2


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 100) -> np.ndarray:
    """Cluster labels 0..k-1 of the rows of ``x``: a k-means++ start drawn from ``seed``, then
    Lloyd iterations until no label changes. An emptied cluster restarts at the row farthest from
    its centre. With k >= rows, each row is its own cluster."""
    n = len(x)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    d2 = squared_distances(x, centres[0][None])[:, 0]
    for _ in range(1, k):  # k-means++: the next centre with probability ~ squared distance
        total = d2.sum()
        index = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centres.append(x[index])
        d2 = np.minimum(d2, squared_distances(x, x[index][None])[:, 0])
    centres = np.stack(centres)
    labels = np.full(n, -1)
    for _ in range(iterations):
        new, d2 = nearest_centre(x, centres)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                centres[j] = x[members].mean(0)
            else:
                far = int(d2.argmax())
                centres[j], labels[far], d2[far] = x[far], j, 0.0
    return labels


def typicality(x: np.ndarray, neighbours: int = 20) -> np.ndarray:
    """TypiClust's typicality of each row: 1 / (mean distance to its ``neighbours`` nearest other
    rows), fewer when there are fewer rows; 0 for a lone row."""
    k = min(neighbours, len(x) - 1)
    if k < 1:
        return np.zeros(len(x))
    out = np.empty(len(x))
    for rows in blocks(len(x), len(x)):
        d2 = squared_distances(x[rows], x)
        d2[np.arange(len(d2)), np.arange(rows.start, rows.stop)] = np.inf  # not itself
        nearest = np.partition(d2, k - 1, axis=1)[:, :k]
        out[rows] = 1.0 / (np.sqrt(nearest).mean(1) + 1e-12)
    return out
